"""The benchmark's model: Llama-3.1-8B's architecture (and --tiny's), a word-level tokenizer over its whole
vocabulary, random weights built and saved once (the build section), and the model-FLOPs arithmetic of MFU."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

from bench.common import Session, write_result

# The architecture of deepseek-ai/DeepSeek-R1-Distill-Llama-8B (its config.json), which is Llama-3.1-8B's.
R1_DISTILL_LLAMA_8B: dict[str, Any] = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001, pad_token_id=128004, tie_word_embeddings=False, initializer_range=0.02,
)
# --tiny: the same pipeline in minutes, to check the benchmark itself (numbers are meaningless).
TINY = {**R1_DISTILL_LLAMA_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
N_SPECIAL = 256  # Llama-3 keeps its last 256 ids for special tokens: 128000 BOS, 128001 EOS, 128004 padding
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|finetune_right_pad_id|>"


def synthetic_prompts(rng, vocab_size: int, n: int) -> list[str]:
    """`n` inference prompts of 40 to 120 random words of the bench tokenizer (one token each): unequal lengths,
    left-padded as the evaluate job pads them."""
    from medcot.prompts import inference_prompt

    n_words = vocab_size - N_SPECIAL
    return [inference_prompt(" ".join(f"w{rng.randrange(n_words - 200)}" for _ in range(rng.randint(40, 120))))
            for _ in range(n)]


def build_tokenizer(folder: Path, vocab_size: int):
    """A word-level tokenizer whose vocabulary covers all of Llama-3's ids: the words of the prompt
    templates, then `w0`, `w1`, ... up to id 127999, then 256 special tokens. A synthetic row of N words
    is exactly N tokens, which is how rows of a chosen token length are made."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from medcot.prompts import INFERENCE_TEMPLATE, TRAIN_TEMPLATE

    n_words = vocab_size - N_SPECIAL
    template_words = dict.fromkeys(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(TRAIN_TEMPLATE + INFERENCE_TEMPLATE))
    words = list(template_words) + [f"w{i}" for i in range(n_words - len(template_words))]
    specials = {0: BOS, 1: EOS, 4: PAD}
    special_tokens = [specials.get(k, f"<|reserved_special_token_{k}|>") for k in range(N_SPECIAL)]
    vocab = {w: i for i, w in enumerate(words + special_tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special_tokens[-1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special_tokens)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=special_tokens[-1], model_max_length=131072)
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, arch: dict[str, Any]) -> dict[str, Any]:
    """Random bf16 weights (seeded) built on the GPU, saved as safetensors with the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, arch["vocab_size"])
    torch.manual_seed(0)
    config = LlamaConfig(**copy.deepcopy(arch), dtype="bfloat16")  # it writes rope_theta into rope_scaling
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # CPU only for a --tiny check of this script
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    built = time.monotonic()
    model.save_pretrained(folder, max_shard_size="5GB")
    saved = time.monotonic()
    params = sum(p.numel() for p in model.parameters())
    (folder / "BENCH_COMPLETE").write_text(json.dumps(arch, sort_keys=True))
    return {"params": params, "build_s": round(built - t0, 1), "save_s": round(saved - built, 1),
            "bytes": sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")}


def model_is_built(folder: Path, arch: dict[str, Any]) -> bool:
    mark = folder / "BENCH_COMPLETE"
    return mark.is_file() and mark.read_text() == json.dumps(arch, sort_keys=True)


def frozen_matmul_params(arch: dict[str, Any]) -> int:
    """Weights of every matrix product of a forward pass: the 7 projections of each layer and lm_head."""
    h, inter, kv = arch["hidden_size"], arch["intermediate_size"], arch["num_key_value_heads"]
    head = h // arch["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv * head + 3 * h * inter
    return arch["num_hidden_layers"] * per_layer + h * arch["vocab_size"]


def train_flops_per_token(arch: dict[str, Any], seq_len: float, lora_params: int) -> float:
    """Model FLOPs of one trained token under LoRA (recomputation by checkpointing not counted):
    frozen weights 2 (forward) + 2 (gradient w.r.t. activations) per weight, no weight gradient;
    LoRA weights 6 per weight (they do get weight gradients); causal attention (QK^T and PV over
    seq/2 keys on average: 2 * seq * hidden forward per layer, 3x that with backward)."""
    attention = 6 * arch["num_hidden_layers"] * seq_len * arch["hidden_size"]
    return 4 * frozen_matmul_params(arch) + 6 * lora_params + attention


def worker_build(spec: dict) -> None:
    folder, arch = Path(spec["model_dir"]), spec["arch"]
    if model_is_built(folder, arch):
        write_result(spec["result"], {"reused": True})
        return
    write_result(spec["result"], {"reused": False, **build_model(folder, arch)})


def run_section(session: Session, name: str) -> None:
    """Section build: the model under WORK, built once and reused while its architecture is the same."""
    session.results["build"] = session.worker("build", session.common, "build", cap_s=600)
