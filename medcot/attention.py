"""Grouped-query attention for decoding without copying the KV cache.

transformers' SDPA path can only pass `enable_gqa` to PyTorch when there is no attention mask; with one (a
left-padded batch, or any static KV cache, whose unused slots are masked) it first expands every KV head to
its query heads with `repeat_kv`, a full copy of the cache per layer per decoded token. For the 8B model
(32 query heads on 8 KV heads) that is 4x the cache written and read again at every step: at batch 32 with
1,200-token answers, more memory traffic than the weights themselves.

For one query token the copy is not needed: the query heads that share a KV head can stand in for query
positions, [batch, kv_heads * groups, 1, dim] -> [batch, kv_heads, groups, dim], attending the cache as it
is; the mask, [batch, 1, 1, kv_len], is the same for all of them. Prefill (several query tokens) and
training take transformers' own SDPA path unchanged.

Which kernel computes that grouped step was measured in the compiled decoding step itself (bench/decode.py, an H200,
batch 101, 1,412 cached positions): PyTorch's memory-efficient kernel (`efficient`), 18.4 ms a step; its default
pick, cuDNN's fused attention (`sdpa`), 20.4 ms (its kernel's name says 64-row query tiles; a KV head here has 4 query rows); two batched
matrix products around an fp32 softmax (`matmul`), 37.7 ms (PyTorch runs a 16-bit product with fp32 output on a
MAGMA kernel). Timed one call at a time outside the compiled step, cuDNN's came first, so the choice is not timed
at run time: `auto` is `efficient` on GPUs where it runs 16-bit (compute capability 8.0 on),
else `sdpa`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GQA_DECODE = "medcot_sdpa_gqa_decode"
DECODE_KERNELS = ("sdpa", "efficient", "matmul")
# The kernel of the grouped decoding step (eval.decode_kernel, resolved); read when the step is traced.
decode_kernel = "sdpa"


def grouped_attention(kernel: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor | None, scale: float | None) -> torch.Tensor:
    """Attention of query [b, kv_heads, groups, d] over key/value [b, kv_heads, kv, d] under a mask broadcast from
    [b, 1, 1, kv] (bool: True attends; or additive), by one of DECODE_KERNELS; returns [b, kv_heads, groups, d]."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    if kernel == "efficient":
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
            return scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    if kernel != "matmul":
        return scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    batch, kv_heads, groups, dim = query.shape
    kv_len = key.shape[2]
    q = query.reshape(batch * kv_heads, groups, dim)
    k_t = key.reshape(batch * kv_heads, kv_len, dim).transpose(1, 2)
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        scores = torch.bmm(q, k_t, out_dtype=torch.float32)  # fp32 out of the 16-bit product, no fp32 copy of K
    else:
        scores = torch.bmm(q.float(), k_t.float())
    scores = scores.view(batch, kv_heads, groups, kv_len) * (dim ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.bmm(probs.view(batch * kv_heads, groups, kv_len), value.reshape(batch * kv_heads, kv_len, dim))
    return out.view(batch, kv_heads, groups, dim)


def resolve_kernel(choice: str, device) -> str:
    """eval.decode_kernel for a model on `device`: `auto` is `efficient` on CUDA GPUs of compute capability 8.0 and
    later (its 16-bit kernels), else `sdpa`; `triton` (medcot's decoder's own kernel, which needs each row's valid
    range) the same as auto; any other value as is."""
    import torch

    if choice not in ("auto", "triton"):
        return choice
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
        return "efficient"
    return "sdpa"


def sdpa_gqa_decode_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """An AttentionInterface function: query [b, heads, q, d], key/value [b, kv_heads, kv, d] -> [b, q, heads, d]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, q_len, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    mask_is_per_row = attention_mask is None or (attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1)
    if q_len != 1 or groups == 1 or dropout or not mask_is_per_row or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # Query head h reads KV head h // groups (the order repeat_kv expands to).
    grouped = query.reshape(batch, kv_heads, groups, dim)
    out = grouped_attention(decode_kernel, grouped, key, value, attention_mask, scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the function (and SDPA's masks for it) with transformers; returns its attn_implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_DECODE, sdpa_gqa_decode_forward)
    AttentionMaskInterface.register(GQA_DECODE, sdpa_mask)
    return GQA_DECODE


def use_for_inference(model, choice: str, kernel: str = "auto") -> str:
    """Switch an inference model's attention per `eval.attention`; returns the implementation in use.

    auto: the grouped decoding above where the model runs on SDPA (models on eager, flash or flex attention
    keep theirs); any other value is passed to transformers as is (`sdpa`, `eager`, `flash_attention_2`...).
    `kernel` (eval.decode_kernel): the grouped step's kernel (resolve_kernel)."""
    global decode_kernel
    decode_kernel = resolve_kernel(kernel, next(model.parameters()).device)
    current = model.config._attn_implementation
    wanted = (register() if current == "sdpa" else current) if choice == "auto" else choice
    if wanted != current:
        model.set_attn_implementation(wanted)
    return model.config._attn_implementation
