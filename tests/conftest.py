"""Shared fixtures: a tiny random Llama with a real (freshly trained) BPE tokenizer, and config helpers."""

from __future__ import annotations

import json
import os
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


def _save_tiny_llama(folder: Path, fast, pad_token_id: int | None) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=fast.eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder)
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
