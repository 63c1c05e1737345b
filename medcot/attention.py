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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GQA_DECODE = "medcot_sdpa_gqa_decode"


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
    import torch
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
    out = torch.nn.functional.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(batch, heads, 1, dim).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the function (and SDPA's masks for it) with transformers; returns its attn_implementation name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(GQA_DECODE, sdpa_gqa_decode_forward)
    AttentionMaskInterface.register(GQA_DECODE, sdpa_mask)
    return GQA_DECODE


def use_for_inference(model, choice: str) -> str:
    """Switch an inference model's attention per `eval.attention`; returns the implementation in use.

    auto: the grouped decoding above where the model runs on SDPA (models on eager, flash or flex attention
    keep theirs); any other value is passed to transformers as is (`sdpa`, `eager`, `flash_attention_2`...)."""
    current = model.config._attn_implementation
    wanted = (register() if current == "sdpa" else current) if choice == "auto" else choice
    if wanted != current:
        model.set_attn_implementation(wanted)
    return model.config._attn_implementation
