"""A split-KV attention kernel for one decoding step of grouped-query attention (Triton).

medcot's decoder (medcot.decoding) keeps a static KV cache of `prompt + max_new_tokens` positions per row and writes
the step's keys at one slot that every row shares (the prompts are left-padded). PyTorch's kernels, given that cache,
read all of it at every step under a mask: at step 1 of 1,200 the whole 1,412 positions, for 212 that hold
anything. This kernel reads only each row's valid range, [start[b], slot], with both bounds read from GPU memory so
that one CUDA graph serves every step:

- `_partials`: one program per (row, KV head, chunk of SPLIT positions). A chunk outside the row's range returns at
  once without reading the cache; the others stream their positions in blocks, the KV head's query heads (the
  "groups", 4 for the 8B model) standing in for query rows of a matrix product, with an online softmax, and write an
  unnormalized partial output with its running max and sum. The products run on fp32 tiles (TF32 on the GPU, which
  holds 16-bit keys and values exactly; Triton's interpreter computes 16-bit `tl.dot` wrongly, and the tests run the
  kernel there).
- `_combine`: one program per (row, KV head) merges the chunks' partials (flash-decoding).

Chunking keeps the GPU's SMs busy at small batches (a batch of 1 has only 8 (row, KV head) pairs), and, at large
ones, lets the programs of chunks past the current slot skip their share. Runs on CPU under TRITON_INTERPRET=1
(the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SPLIT = 256  # cache positions per program
BLOCK = 64  # positions per inner step (a matrix product of [rows, head dim] x [head dim, BLOCK])
NUM_WARPS, NUM_STAGES = 4, 2


@triton.jit
def _partials(Q, K, V, SLOT, START, ACC, M, L, scale,
              stride_qb, stride_qh, stride_qg, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
              KV_HEADS: tl.constexpr, GROUPS: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr,
              CHUNKS: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    pair = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pair // KV_HEADS
    h = pair % KV_HEADS
    lo = tl.maximum(tl.load(START + b), chunk * SPLIT)
    hi = tl.minimum(tl.load(SLOT) + 1, (chunk + 1) * SPLIT)
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, DIM)
    out = (pair * CHUNKS + chunk) * ROWS
    if lo < hi:
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qg + dims[None, :],
                    mask=rows[:, None] < GROUPS, other=0.0).to(tl.float32)
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM], tl.float32)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        for step in range(SPLIT // BLOCK):
            pos = chunk * SPLIT + step * BLOCK + tl.arange(0, BLOCK)
            valid = (pos >= lo) & (pos < hi)
            k = tl.load(k_base + pos[:, None] * stride_ks + dims[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            v = tl.load(v_base + pos[:, None] * stride_vs + dims[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block of the chunk before the row's start
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p, v)
            m_i = m_new
        tl.store(ACC + (out + rows[:, None]) * DIM + dims[None, :], acc)
        tl.store(M + out + rows, m_i)
        tl.store(L + out + rows, l_i)
    else:
        tl.store(M + out + rows, tl.full([ROWS], float("-inf"), tl.float32))
        tl.store(L + out + rows, tl.zeros([ROWS], tl.float32))


@triton.jit
def _combine(ACC, M, L, OUT, GROUPS: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr, CHUNKS: tl.constexpr):
    pair = tl.program_id(0)
    rows = tl.arange(0, ROWS)
    dims = tl.arange(0, DIM)
    m = tl.full([ROWS], float("-inf"), tl.float32)
    for c in range(CHUNKS):
        m = tl.maximum(m, tl.load(M + (pair * CHUNKS + c) * ROWS + rows))
    total = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DIM], tl.float32)
    for c in range(CHUNKS):
        base = (pair * CHUNKS + c) * ROWS
        m_c = tl.load(M + base + rows)
        w = tl.where(m_c == float("-inf"), 0.0, tl.exp(m_c - m))  # an empty chunk weighs nothing
        total += w * tl.load(L + base + rows)
        acc += w[:, None] * tl.load(ACC + (base + rows[:, None]) * DIM + dims[None, :],
                                    mask=(m_c != float("-inf"))[:, None], other=0.0)
    out = acc / total[:, None]
    tl.store(OUT + (pair * GROUPS + rows[:, None]) * DIM + dims[None, :], out.to(OUT.dtype.element_ty),
             mask=rows[:, None] < GROUPS)


def supports(head_dim: int, groups: int) -> bool:
    """Head sizes the kernel compiles for: a power of two from 16 (tl.arange, tl.dot); at most 16 query heads per KV head."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0 and groups <= 16


def gqa_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot: torch.Tensor, start: torch.Tensor,
               scale: float, *, split: int = SPLIT, block: int = BLOCK, num_warps: int = NUM_WARPS,
               num_stages: int = NUM_STAGES) -> torch.Tensor:
    """Attention of query [b, kv_heads, groups, d] over cache positions [start[b], slot] of key/value
    [b, kv_heads, positions, d] (last dimension contiguous); returns [b, kv_heads, groups, d] in query's dtype.
    The tile sizes default to the module's (bench/kernel_tune.py measures the others)."""
    batch, kv_heads, groups, dim = query.shape
    positions = key.shape[2]
    chunks = triton.cdiv(positions, split)
    rows = max(16, triton.next_power_of_2(groups))  # tl.dot's smallest tile
    pairs = batch * kv_heads
    acc = torch.empty(pairs * chunks * rows * dim, device=query.device, dtype=torch.float32)
    m = torch.empty(pairs * chunks * rows, device=query.device, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    out = torch.empty(batch, kv_heads, groups, dim, device=query.device, dtype=query.dtype)
    _partials[(pairs, chunks)](
        query, key, value, slot, start, acc, m, l_sum, scale,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        KV_HEADS=kv_heads, GROUPS=groups, ROWS=rows, DIM=dim, CHUNKS=chunks, SPLIT=split, BLOCK=block,
        num_warps=num_warps, num_stages=num_stages,
    )
    _combine[(pairs,)](acc, m, l_sum, out, GROUPS=groups, ROWS=rows, DIM=dim, CHUNKS=chunks)
    return out
