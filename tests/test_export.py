"""The export job without llama.cpp: the GGUF file's bytes, metadata and tokenizer, the Modelfile, and the stage's
behaviour (publication, reruns, bad input). tests/test_export_llamacpp.py loads the files in llama.cpp itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from test_reliability_resources import small_disk  # noqa: F401 -- a real tmpfs of 24 MiB, as a fixture

import medcot.export
from medcot.config import ConfigError, load_config
from medcot.data import prepare
from medcot.evaluate import eval_items
from medcot.export import (
    MODELFILE,
    OLLAMA_PARAMS,
    OLLAMA_TEMPLATE,
    ExportError,
    GgufModel,
    _add_metadata,
    end_tokens,
    export_stage,
    llama3_rope_factors,
    pre_tokenizer_name,
    rotary_permute,
    write_gguf,
)
from medcot.merge import merge_stage
from medcot.modeling import select_backend
from medcot.prompts import answer_end_id, inference_prompt, serving_prompt
from medcot.rundir import ResourceError, StageError
from medcot.training import train_stage

from conftest import MCQ_SAMPLE, ROOT, SAMPLE, build_tiny_llama, build_tiny_r1, ollama_fill, parse_modelfile


def run_overrides(base: Path, out: Path, *extra: str) -> list[str]:
    """A tiny run whose evaluate job answers 10 questions: 7 held out, the showcase, 2 multiple choice."""
    return [f"model.name={base}", "model.max_seq_length=1024", f"data.path={SAMPLE}", "data.train_rows=16",
            "data.heldout_rows=7", f"output_dir={out}", "lora.use_gradient_checkpointing=false",
            "training.max_steps=2", "training.warmup_steps=0", "training.optim=adamw_torch",
            "training.learning_rate=1e-3", "tracking.report_to=none",
            f"eval.mcq=[{{path: {MCQ_SAMPLE}, limit: 2}}]", *extra]


def trained_and_merged(base: Path, out: Path, *extra: str):
    config = load_config(None, run_overrides(base, out, *extra))
    runtime = select_backend(config.model)
    train_stage(config, runtime)
    merge_stage(config, runtime)
    return config


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory):
    """The tiny Llama (grouped-query attention, untied output) trained and merged with data.template: recipe."""
    tmp = tmp_path_factory.mktemp("export-recipe")
    return trained_and_merged(build_tiny_llama(tmp / "base"), tmp / "out", "run_name=recipe")


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """Trained with data.template: chat on an R1-shaped tokenizer whose EOS is not the token that closes a turn."""
    tmp = tmp_path_factory.mktemp("export-chat")
    base = build_tiny_r1(tmp / "base", eos_token="<|end_of_text|>")
    return trained_and_merged(base, tmp / "out", "run_name=chat", "data.template=chat", "training.max_steps=1")


def merged(config) -> Path:
    return config.run_dir / "merge" / "model"


def evaluate_prompts(config, tokenizer) -> list[str]:
    """The evaluate job's own prompts for this config: its questions, in its serving template."""
    items = eval_items(config, prepare(config.data, tokenizer, config.model.max_seq_length).heldout)
    assert len(items) == 10
    return [serving_prompt(config.data.template, tokenizer, item.question) for item in items]


# ---- the file ---------------------------------------------------------------------------------------------------

def test_rotary_permutation_turns_halves_rotation_into_llama_cpps_adjacent_pairs():
    """transformers rotates dimension j of a head with j + d/2; llama.cpp rotates 2j with 2j+1. The permuted q/k rows
    give llama.cpp's rotation of the permuted vector, which is transformers' rotation of the original, reordered."""
    rng = np.random.default_rng(0)
    heads, head_dim, hidden, position = 2, 8, 16, 5
    weight, x = rng.standard_normal((heads * head_dim, hidden)), rng.standard_normal(hidden)
    angles = position * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(angles), np.sin(angles)

    def rope_halves(v):  # transformers' rotate_half
        first, second = v[: head_dim // 2], v[head_dim // 2:]
        return np.concatenate([first * cos - second * sin, second * cos + first * sin])

    def rope_adjacent(v):  # llama.cpp's normal RoPE
        even, odd = v[0::2], v[1::2]
        out = np.empty_like(v)
        out[0::2], out[1::2] = even * cos - odd * sin, odd * cos + even * sin
        return out

    q = (weight @ x).reshape(heads, head_dim)
    q_gguf = (rotary_permute(weight, heads) @ x).reshape(heads, head_dim)
    expected = rotary_permute(np.stack([rope_halves(h) for h in q]).reshape(heads * head_dim, 1), heads)
    np.testing.assert_allclose(np.stack([rope_adjacent(h) for h in q_gguf]).reshape(-1, 1), expected, atol=1e-12)


def reference_file(model: GgufModel, type_name: str, path: Path) -> bytes:
    """The same model written the plain gguf-py way: every tensor whole, in memory, then write_tensors_to_file."""
    from safetensors.torch import load_file

    _, file_type, _ = medcot.export.TYPES[type_name]
    weights = {}
    for file in model.folder.glob("*.safetensors"):
        weights.update(load_file(file))
    by_gguf_name = {t.name: t for t in model.plan(type_name)}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    writer = gguf.GGUFWriter(path, "llama")
    _add_metadata(writer, model.config, model.vocab, model.chat_template, file_type, "x")
    for hf_name, tensor in weights.items():
        t = by_gguf_name[names.get_name(hf_name, try_suffixes=(".weight",))]
        data = tensor.float().numpy()
        if t.rotary_heads:
            data = rotary_permute(data, t.rotary_heads)
        writer.add_tensor(t.name, gguf.quants.quantize(data, t.qtype), raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize("type_name", ["q8_0", "f16", "bf16"])
def test_streamed_file_from_any_number_of_threads_is_byte_identical_to_gguf_py_writing_whole_tensors(
        recipe_run, tmp_path, monkeypatch, type_name):
    monkeypatch.setattr(medcot.export, "BLOCK_WEIGHTS", 2048)  # several blocks a tensor, so threads share tensors
    model = GgufModel.read(merged(recipe_run), "recipe")
    expected = reference_file(model, type_name, tmp_path / "reference.gguf")
    for workers in (1, 3):
        write_gguf(model, type_name, tmp_path / f"{workers}.gguf", workers=workers, name="x")
        assert (tmp_path / f"{workers}.gguf").read_bytes() == expected, workers


def test_file_holds_every_weight_under_gguf_names_with_norms_in_float32(recipe_run, tmp_path):
    from safetensors.torch import load_file

    model = GgufModel.read(merged(recipe_run), "recipe")
    write_gguf(model, "f16", tmp_path / "m.gguf", workers=2, name="x")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    hf = {names.get_name(k, try_suffixes=(".weight",)): v for k, v in load_file(next(merged(recipe_run).glob("*.safetensors"))).items()}
    assert {t.name for t in reader.tensors} == set(hf) and "output.weight" in hf  # the untied head is written
    for t in reader.tensors:
        weights = gguf.quants.dequantize(t.data, t.tensor_type).reshape(hf[t.name].shape)
        heads = {"attn_q": 4, "attn_k": 2}.get(t.name.split(".")[-2], 0)
        original = hf[t.name].float().numpy()
        assert np.array_equal(weights, rotary_permute(original, heads) if heads else original), t.name
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if len(hf[t.name].shape) == 1 else gguf.GGMLQuantizationType.F16)


def test_metadata_carries_architecture_tokenizer_and_the_trained_end_token(recipe_run, tmp_path):
    from transformers import AutoTokenizer

    model = GgufModel.read(merged(recipe_run), "recipe")
    write_gguf(model, "q8_0", tmp_path / "m.gguf", workers=1, name="recipe")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields

    def value(key):
        return fields[key].contents()

    tokenizer = AutoTokenizer.from_pretrained(merged(recipe_run))
    assert value("general.architecture") == "llama" and value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (value("llama.block_count"), value("llama.attention.head_count"), value("llama.attention.head_count_kv")) == (2, 4, 2)
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    assert value("tokenizer.ggml.tokens") == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert value("tokenizer.ggml.eos_token_id") == answer_end_id("recipe", tokenizer) == tokenizer.eos_token_id
    assert value("tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id and value("tokenizer.ggml.add_bos_token") is True
    assert len(value("tokenizer.ggml.merges")) == len(json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"])


def test_llama3_rope_scaling_is_written_as_the_factors_transformers_applies():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    # DeepSeek-R1-Distill-Llama-8B's (Llama 3.1's) rotary settings, from its config.json.
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    head_dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / (config.rope_parameters["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim))
    np.testing.assert_allclose(llama3_rope_factors(config), (plain / scaled).numpy(), rtol=1e-5)
    assert set(np.round(llama3_rope_factors(config), 4)) >= {1.0, 8.0}  # both ends of the scaling are reached


# ---- the tokenizer ------------------------------------------------------------------------------------------------

def test_pre_tokenizer_of_a_gpt2_style_bpe_is_llama_cpps_gpt2(recipe_run):
    from transformers import AutoTokenizer

    assert pre_tokenizer_name(AutoTokenizer.from_pretrained(merged(recipe_run))) == "gpt-2"


def test_smollm2_converted_by_transformers_gets_llama_cpps_smollm_pre_tokenizer():
    """Its tokenizer.json splits like GPT-2 (transformers' GGUF converter dropped SmolLM's digit split), but its
    vocabulary merges no digits, so SmolLM's split gives the same tokens, and llama.cpp's table knows its hash."""
    from transformers import AutoTokenizer

    from medcot.export import KNOWN_TOKENIZER_HASHES, llama_cpp_tokenizer_hash
    from medcot.modeling import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct"))
    assert KNOWN_TOKENIZER_HASHES[llama_cpp_tokenizer_hash(tokenizer)] == "smollm"
    assert pre_tokenizer_name(tokenizer) == "smollm"


def trained_bpe(pre_tokenizer, decoder=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizer, decoder
    texts = [inference_prompt(row["Question"]) for row in json.loads("[" + ",".join(SAMPLE.read_text().splitlines()) + "]")]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_byte_level_tokenizer_that_splits_unlike_llama_cpp_is_refused_with_the_way_out():
    from tokenizers import decoders, pre_tokenizers

    # Bytes without a split into words: its merges join words, which no pre-tokenizer of llama.cpp's would let them.
    unsplit = trained_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False), decoders.ByteLevel())
    with pytest.raises(ExportError, match=r"splits text unlike any pre-tokenizer .*\(gpt-2, llama-bpe, smollm\).*"
                                          r"convert_hf_to_gguf\.py"):
        pre_tokenizer_name(unsplit)


def test_tokenizer_that_loses_text_is_refused():
    from tokenizers import pre_tokenizers

    with pytest.raises(ExportError, match=r"does not give text back as it was .*convert_hf_to_gguf\.py"):
        pre_tokenizer_name(trained_bpe(pre_tokenizers.Whitespace()))  # drops the spaces


def test_architecture_other_than_llama_is_refused_naming_the_supported_one(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(ExportError, match=r"is a Qwen2ForCausalLM; the export job writes GGUF for LlamaForCausalLM"):
        GgufModel.read(tmp_path, "recipe")


# ---- prompts and the Modelfile -------------------------------------------------------------------------------------

def test_recipe_chat_template_in_the_file_renders_the_recipes_prompt(recipe_run):
    """llama-server, llama-cli and LM Studio apply the GGUF's chat template: for a recipe-trained model it must send
    the recipe's prompt, not the base tokenizer's chat template."""
    from transformers import AutoTokenizer

    model = GgufModel.read(merged(recipe_run), "recipe")
    tokenizer = AutoTokenizer.from_pretrained(merged(recipe_run))
    for prompt_question in ("What causes stress incontinence?", "It's a 'quoted' question\nover two lines?"):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt_question}], tokenize=False,
                                                 add_generation_prompt=True, chat_template=model.chat_template)
        assert rendered == inference_prompt(prompt_question)


def exported(config) -> Path:
    export_stage(config)
    return config.run_dir / "export"


def test_modelfile_stops_on_the_tokenizers_end_tokens_and_points_at_the_file(recipe_run, chat_run):
    from transformers import AutoTokenizer

    for config in (recipe_run, chat_run):
        folder = exported(config)
        modelfile = parse_modelfile((folder / MODELFILE).read_text(encoding="utf-8"))
        tokenizer = AutoTokenizer.from_pretrained(merged(config))
        assert modelfile["parameters"]["stop"] == end_tokens(merged(config), tokenizer)
        assert (folder / modelfile["FROM"]).is_file() and modelfile["FROM"] == f"./{config.run_name}-Q8_0.gguf"
        assert json.loads((folder / OLLAMA_PARAMS).read_text())["stop"] == modelfile["parameters"]["stop"]
        assert (folder / OLLAMA_TEMPLATE).read_text(encoding="utf-8") == modelfile["TEMPLATE"]
    # The chat run's base ends text with <|end_of_text|>; training ended answers with R1's end of turn: both stop it.
    assert parse_modelfile((chat_run.run_dir / "export" / MODELFILE).read_text())["parameters"]["stop"] == [
        "<｜end▁of▁sentence｜>", "<|end_of_text|>"]


def test_modelfile_template_filled_as_ollama_fills_it_is_the_evaluate_jobs_prompt(recipe_run, chat_run):
    """Character for character, for the evaluate job's 10 questions; where llama.cpp adds BOS (add_bos_token), the
    rendered chat template's own BOS is left to it, so the text follows that BOS."""
    from transformers import AutoTokenizer

    for config in (recipe_run, chat_run):
        folder = exported(config)
        template = parse_modelfile((folder / MODELFILE).read_text(encoding="utf-8"))["TEMPLATE"]
        tokenizer = AutoTokenizer.from_pretrained(merged(config))
        add_bos = gguf.GGUFReader(next(folder.glob("*.gguf"))).fields["tokenizer.ggml.add_bos_token"].contents()
        for prompt, item in zip(evaluate_prompts(config, tokenizer), eval_items(config, prepare(
                config.data, tokenizer, config.model.max_seq_length).heldout), strict=True):
            filled = ollama_fill(template, item.question)
            assert (tokenizer.bos_token + filled if config.data.template == "chat" and add_bos else filled) == prompt


def test_export_publishes_files_with_a_manifest_and_a_rerun_does_nothing(recipe_run, caplog):
    folder = exported(recipe_run)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [f["file"] for f in manifest["extra"]["files"]] == ["recipe-Q8_0.gguf"]
    assert manifest["inputs"]["merge"] and manifest["extra"]["pre_tokenizer"] == "gpt-2"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["recipe-Q8_0.gguf", MODELFILE, OLLAMA_TEMPLATE, OLLAMA_PARAMS, "config.yaml", "manifest.json"])
    before = (folder / "manifest.json").read_bytes()
    with caplog.at_level("INFO"):
        assert export_stage(recipe_run) == 0
    assert "already finished" in caplog.text and (folder / "manifest.json").read_bytes() == before


def test_other_types_refuse_to_replace_a_finished_export_without_force_then_redo_it(recipe_run):
    exported(recipe_run)
    both = recipe_run.model_copy(update={"export": recipe_run.export.model_copy(update={"types": ["f16", "q8_0"]})})
    with pytest.raises(StageError, match="stage 'export' .* different config; pass --force"):
        export_stage(both)
    export_stage(both, force=True)
    files = sorted(p.name for p in (recipe_run.run_dir / "export").glob("*.gguf"))
    assert files == ["recipe-F16.gguf", "recipe-Q8_0.gguf"]
    modelfile = parse_modelfile((recipe_run.run_dir / "export" / MODELFILE).read_text())
    assert modelfile["FROM"] == "./recipe-F16.gguf"  # the first type listed
    export_stage(recipe_run, force=True)  # back to the default for the other tests


def test_export_without_a_merged_model_names_the_merge_job(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}", "run_name=never-merged"])
    with pytest.raises(StageError, match=r"export needs the 'merge' stage.*does not exist; run the merge job \(make merge\)"):
        export_stage(config)


def test_unknown_type_is_refused_with_the_types_there_are():
    with pytest.raises(ConfigError, match=r"export\.types\.0: Input should be 'q8_0', 'f16' or 'bf16' \(got 'q4_k_m'\)"):
        load_config(None, ["export.types=[q4_k_m]"])


def test_export_on_a_disk_without_room_says_how_much_is_needed_and_publishes_nothing(recipe_run, small_disk):  # noqa: F811
    import shutil

    run = small_disk / "out" / recipe_run.run_name
    shutil.copytree(recipe_run.run_dir / "merge", run / "merge")  # the finished merge stage, on the small disk
    config = recipe_run.model_copy(update={"output_dir": str(small_disk / "out")})
    with pytest.raises(ResourceError, match=r"export: .* has [\d.]+ GB free but the GGUF files need about [\d.]+ GB; .*"
                                            r"export\.types=\[q8_0\]"):
        export_stage(config)
    assert not (run / "export").exists() and not (run / ".staging").exists()


def test_export_job_reports_a_missing_merge_in_one_line_and_exits_1(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), f"output_dir={tmp_path}", "run_name=x"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "run the merge job (make merge)" in errors[0] and "Traceback" not in done.stderr
