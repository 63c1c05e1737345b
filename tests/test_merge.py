"""Merge: the 16-bit merged model behaves like base + adapter and loads with plain transformers."""

import pytest
import torch

from medcot.config import load_config
from medcot.merge import merge_stage
from medcot.modeling import select_backend
from medcot.rundir import StageError
from medcot.training import train_stage


@pytest.fixture(scope="module")
def merged_run(tmp_path_factory, tiny_model):
    from conftest import SAMPLE

    out = tmp_path_factory.mktemp("merge")
    config = load_config(None, [
        f"model.name={tiny_model}", "model.max_seq_length=1024", f"data.path={SAMPLE}", "data.train_rows=24",
        "data.heldout_rows=0", f"output_dir={out}", "run_name=m", "lora.use_gradient_checkpointing=false",
        "training.max_steps=3", "training.warmup_steps=0", "training.learning_rate=5e-3", "training.optim=adamw_torch",
        "tracking.report_to=none", "merge.dtype=bfloat16",
    ])
    runtime = select_backend(config.model)
    train_stage(config, runtime)
    merge_stage(config, runtime)
    return config


def test_merged_model_matches_base_plus_adapter_logits_and_greedy_tokens(merged_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = merged_run.run_dir
    tok = AutoTokenizer.from_pretrained(run / "merge" / "model")
    ids = tok("A 61-year-old woman with stress incontinence", return_tensors="pt")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(run / "merge" / "model", dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(merged_run.model.name, dtype=torch.float32),
                                          run / "train" / "adapter").eval()
    with torch.no_grad():
        a, b = merged(ids).logits[0, -1], reference(ids).logits[0, -1]
        greedy = [m.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)[0].tolist()
                  for m in (merged, reference)]
    # bf16 weights carry ~3 significant digits: compare against the logit scale.
    assert (a - b).abs().max() <= 2e-2 * b.abs().max()
    assert greedy[0] == greedy[1]
    # The adapter changed the model, so the equality above is not trivially true of the base.
    base = AutoModelForCausalLM.from_pretrained(merged_run.model.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits[0, -1], b, atol=1e-4)


def test_merged_folder_is_plain_16bit_transformers_with_tokenizer(merged_run):
    from safetensors import safe_open

    folder = merged_run.run_dir / "merge" / "model"
    assert not (folder / "adapter_config.json").exists()
    assert (folder / "tokenizer.json").is_file() and (folder / "config.json").is_file()
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as f:
        names = list(f.keys())
        dtypes = {f.get_tensor(k).dtype for k in names}
    assert not any("lora" in k for k in names)
    assert dtypes == {torch.bfloat16}
    assert (merged_run.run_dir / "merge" / "adapter" / "adapter_config.json").is_file()


def test_merge_refuses_to_start_without_a_finished_train_stage(tiny_config):
    config = load_config(None, tiny_config("run_name=never-trained"))
    with pytest.raises(StageError, match="needs the 'train' stage.*does not exist.*make train"):
        merge_stage(config, select_backend(config.model))


def test_merge_refuses_an_incomplete_train_stage(tiny_config):
    config = load_config(None, tiny_config("run_name=half-written"))
    (config.run_dir / "train" / "adapter").mkdir(parents=True)  # as a killed job without publishing would leave it
    with pytest.raises(StageError, match="is incomplete"):
        merge_stage(config, select_backend(config.model))


def test_the_merge_loads_the_base_in_fp32_on_the_gpu_where_it_fits_else_in_16_bits_else_on_the_cpu():
    from medcot.merge import MERGE_MARGIN_BYTES, merge_precision

    params = 8_030_261_248  # DeepSeek-R1-Distill-Llama-8B
    fp32, fp16 = params * 4 * 1.05 + MERGE_MARGIN_BYTES, params * 2 * 1.05 + MERGE_MARGIN_BYTES
    assert merge_precision(params, int(fp32) + 1, torch.float16) == (torch.float32, "cuda")  # an 80 GB GPU
    assert merge_precision(params, int(fp16) + 1, torch.float16) == (torch.float16, "cuda")  # a 24 GB GPU
    assert merge_precision(params, int(fp16) - 1, torch.float16) == (torch.float32, "cpu")
    assert merge_precision(None, 2**40, torch.float16) == (torch.float32, "cpu")  # a model it cannot size


def trained_end_token(config) -> int:
    """The last token of every training row the train job built: what the model learned to end answers with."""
    from transformers import AutoTokenizer

    from medcot.data import prepare, tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(config.model.name)
    rows = prepare(config.data, tokenizer, config.model.max_seq_length).train
    ends = {tokenize_example(ex, tokenizer, config.data.template)["input_ids"][-1] for ex in rows}
    assert len(ends) == 1
    return ends.pop()


def served_end_tokens(folder) -> tuple[set[int], int]:
    """(generation_config.json's eos_token_id, the tokenizer's EOS id) of a model folder, as a server reads them."""
    import json

    from transformers import AutoTokenizer

    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos]), AutoTokenizer.from_pretrained(folder).eos_token_id


def test_merged_recipe_model_stops_on_the_eos_it_was_trained_to_emit(merged_run):
    generation, tokenizer = served_end_tokens(merged_run.run_dir / "merge" / "model")
    assert trained_end_token(merged_run) in generation and tokenizer == trained_end_token(merged_run)


@pytest.fixture(scope="module")
def merged_chat_run(tmp_path_factory):
    """Trained and merged with data.template: chat on a tokenizer whose EOS (<|end_of_text|>) is not the token its chat
    template closes turns with, as in Llama 3's first releases."""
    from conftest import SAMPLE, build_tiny_r1

    tmp_path = tmp_path_factory.mktemp("merge-chat")
    base = build_tiny_r1(tmp_path / "base", eos_token="<|end_of_text|>")
    config = load_config(None, [
        f"model.name={base}", "model.max_seq_length=1024", f"data.path={SAMPLE}", "data.train_rows=8",
        "data.heldout_rows=0", "data.template=chat", f"output_dir={tmp_path / 'out'}", "run_name=chat",
        "lora.use_gradient_checkpointing=false", "training.max_steps=1", "training.warmup_steps=0",
        "training.optim=adamw_torch", "tracking.report_to=none", "eval.max_new_tokens=4", "push.what=[merged]",
    ])
    runtime = select_backend(config.model)
    train_stage(config, runtime)
    merge_stage(config, runtime)
    return config


def test_merged_chat_model_stops_on_the_end_of_turn_even_where_the_base_eos_differs(merged_chat_run):
    """The merged folder must name the token training ended answers with, or a server never stops."""
    from transformers import AutoTokenizer

    from conftest import R1_EOS

    end = trained_end_token(merged_chat_run)
    assert AutoTokenizer.from_pretrained(merged_chat_run.model.name).convert_ids_to_tokens(end) == R1_EOS
    generation, tokenizer = served_end_tokens(merged_chat_run.run_dir / "merge" / "model")
    assert end in generation and tokenizer == end


def card_snippet_inputs(config) -> list[int]:
    """Run the model card's usage snippet on the merged folder (standing in for the Hub repo); the prompt it sent."""
    import re

    from medcot.push import build_model_card

    folder = config.run_dir / "merge" / "model"
    card = build_model_card(config, config.run_dir, repo_id=str(folder))
    namespace: dict = {}
    exec(re.search(r"## Usage\n\n```python\n(.*?)\n```", card, re.S).group(1), namespace)  # noqa: S102
    return namespace["inputs"]["input_ids"][0].tolist()


def test_card_snippet_of_a_chat_model_sends_what_a_chat_server_sends(merged_chat_run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_chat_run.run_dir / "merge" / "model")
    question = "A 45-year-old presents with crushing chest pain radiating to the left arm. Next step?"
    server = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    assert card_snippet_inputs(merged_chat_run) == server["input_ids"]


def test_card_snippet_of_a_recipe_model_sends_the_recipes_prompt(merged_run):
    from transformers import AutoTokenizer

    from medcot.prompts import inference_prompt

    tokenizer = AutoTokenizer.from_pretrained(merged_run.run_dir / "merge" / "model")
    question = "A 45-year-old presents with crushing chest pain radiating to the left arm. Next step?"
    config = merged_run.model_copy(update={"eval": merged_run.eval.model_copy(update={"max_new_tokens": 4})})
    assert card_snippet_inputs(config) == tokenizer(inference_prompt(question))["input_ids"]


def test_merge_writes_shards_that_load_as_one_model_and_hash_side_by_side(merged_run, tmp_path, monkeypatch):
    """The 8B model's 16 GB go out in 5 GB shards (medcot.merge.MAX_SHARD_SIZE); here the limit is made small enough
    to shard the tiny model. The shards load to the same weights, and the push plan hashes each of them."""
    import hashlib

    from transformers import AutoModelForCausalLM

    import medcot.merge
    from medcot.push import _folder_files

    monkeypatch.setattr(medcot.merge, "MAX_SHARD_SIZE", "100KB")
    run = merged_run.run_dir
    sharded = tmp_path / "model"
    medcot.merge.merge_adapter(merged_run, select_backend(merged_run.model), run / "train" / "adapter", sharded)
    shards = sorted(sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").is_file()
    one = AutoModelForCausalLM.from_pretrained(run / "merge" / "model").state_dict()
    many = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    planned = {f.path_in_repo: f.sha256 for f in _folder_files(sharded, "", tmp_path)}
    assert {s.name: hashlib.sha256(s.read_bytes()).hexdigest() for s in shards}.items() <= planned.items()
