"""medcot.attention: grouped-query decoding gives transformers' SDPA results without copying the KV cache."""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import medcot.attention
from medcot.attention import (
    DECODE_KERNELS,
    GQA_DECODE,
    grouped_attention,
    sdpa_gqa_decode_forward,
    )
from medcot.config import load_config
from medcot.modeling import load_with_adapter, select_backend


class _Module(torch.nn.Module):
    """What the attention functions read from a Llama attention layer."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _qkv(batch=3, heads=8, kv_heads=2, q_len=1, kv_len=9, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, q_len, dim, generator=g), torch.randn(batch, kv_heads, kv_len, dim, generator=g),
            torch.randn(batch, kv_heads, kv_len, dim, generator=g))


def _left_padding_mask(batch: int, kv_len: int, q_len: int = 1) -> torch.Tensor:
    """Row i has i padded slots on the left and, like a static cache, two unused slots on the right."""
    keep = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool)
    for i in range(batch):
        keep[i, ..., :i] = False
    keep[..., -2:] = False
    return keep


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_one_token_query_equals_transformers_sdpa_with_repeated_kv(mask_kind):
    query, key, value = _qkv()
    mask = None if mask_kind == "none" else _left_padding_mask(3, 9)
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = _Module(groups=4)
    ours, _ = sdpa_gqa_decode_forward(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert ours.shape == theirs.shape == (3, 1, 8, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel", DECODE_KERNELS)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_every_decode_kernel_equals_transformers_sdpa(kernel, mask_kind, monkeypatch):
    if kernel == "efficient" and not torch.cuda.is_available():
        pytest.skip("PyTorch's memory-efficient attention runs on CUDA only")
    query, key, value = _qkv(kv_len=11)
    mask = None if mask_kind == "none" else _left_padding_mask(3, 11)
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    module = _Module(groups=4)
    monkeypatch.setattr(medcot.attention, "decode_kernel", kernel)
    ours, _ = sdpa_gqa_decode_forward(module, query, key, value, mask, scaling=0.25)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_matmul_kernel_in_bf16_stays_within_bf16_rounding_of_fp32_attention():
    query, key, value = (t.to(torch.bfloat16) for t in _qkv(kv_len=40, dim=64, seed=3))
    mask = _left_padding_mask(3, 40)
    grouped = query.reshape(3, 2, 4, 64)
    ours = grouped_attention("matmul", grouped, key, value, mask, None).float()
    exact = grouped_attention("sdpa", grouped.float(), key.float(), value.float(), mask, None)
    torch.testing.assert_close(ours, exact, atol=2e-2, rtol=2e-2)


def test_auto_kernel_is_sdpa_off_a_gpu_and_a_pinned_one_stays():
    from medcot.attention import resolve_kernel

    assert resolve_kernel("auto", torch.device("cpu")) == "sdpa"
    assert resolve_kernel("matmul", torch.device("cpu")) == "matmul"


def test_several_query_tokens_take_transformers_sdpa_path_unchanged():
    query, key, value = _qkv(q_len=5, kv_len=5)
    mask = _left_padding_mask(3, 5, q_len=5) & torch.ones(5, 5, dtype=torch.bool).tril()
    module = _Module(groups=4)
    ours, _ = sdpa_gqa_decode_forward(module, query, key, value, mask)
    theirs, _ = sdpa_attention_forward(module, query, key, value, mask)
    assert torch.equal(ours, theirs)


def _generate(model, tokenizer, prompts, static: bool):
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id,
                             cache_implementation="static" if static else None,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
def test_evaluate_models_decode_with_grouped_attention_and_match_plain_sdpa(tiny_config, static, monkeypatch):
    """The evaluate job's model (load_with_adapter) decodes through the grouped path; tokens and logits of a
    left-padded batch equal those of transformers' own SDPA."""
    prompts = ["A 45-year-old man with chest pain", "Fever", "What is the first-line treatment of anaphylaxis?"]
    results, grouped_steps = {}, {}
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def recording_sdpa(query, *args, **kwargs):
        calls.append(tuple(query.shape))
        return real_sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    for attention in ("auto", "sdpa"):
        config = load_config(None, tiny_config(f"eval.attention={attention}"))
        model, tokenizer = load_with_adapter(config, select_backend(config.model), None)
        assert model.config._attn_implementation == (GQA_DECODE if attention == "auto" else "sdpa")
        calls.clear()
        results[attention] = _generate(model, tokenizer, prompts, static)
        # [batch, kv_heads, groups, dim]: the tiny Llama's 4 query heads on 2 KV heads, as a grouped step sees them
        grouped_steps[attention] = sum(shape == (3, 2, 2, 16) for shape in calls)
    # 2 layers x 11 decoding steps after the prefill
    assert grouped_steps == {"auto": 2 * 11, "sdpa": 0}
    assert torch.equal(results["auto"][0], results["sdpa"][0])
    torch.testing.assert_close(results["auto"][1], results["sdpa"][1], atol=1e-5, rtol=1e-5)


def test_eval_attention_passes_any_other_implementation_to_transformers(tiny_config):
    config = load_config(None, tiny_config("eval.attention=eager"))
    model, _ = load_with_adapter(config, select_backend(config.model), None)
    assert model.config._attn_implementation == "eager"
