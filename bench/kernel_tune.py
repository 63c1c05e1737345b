"""Tile sizes of medcot.kernels' decoding attention, timed on this GPU at the 8B model's shapes.

    python3 bench/kernel_tune.py --out DIR     # on a GPU; prints the table, writes DIR/kernel-tune.json

Each (split, block, warps, stages) is checked against fp32 SDPA first, then timed with CUDA events over 50 calls at
three cache positions of a 212 + 1,200-position cache (the chain's evaluate jobs: batch 101), and at batch 8; PyTorch's
memory-efficient kernel over the whole cache under a mask is the baseline. The module's defaults are what the best
mean over the batch-101 positions picked.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import timed  # noqa: E402
from medcot import kernels  # noqa: E402
from medcot.decoding import gqa_decode  # noqa: E402

PROMPT, TOKENS, KV_HEADS, GROUPS, DIM = 212, 1200, 8, 4, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    positions = PROMPT + TOKENS
    slots = (PROMPT, PROMPT + TOKENS // 2, positions - 1)
    cases = [(101, s) for s in slots] + [(8, PROMPT + TOKENS // 2)]
    inputs = {}
    for batch in sorted({b for b, _ in cases}):
        q = torch.randn(batch, KV_HEADS, GROUPS, DIM, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(batch, KV_HEADS, positions, DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        inputs[batch] = (q, k, v, torch.randint(0, 60, (batch,), device="cuda"))
    scale = DIM ** -0.5
    rows = []
    baseline = {f"{b}@{s}": timed(lambda b=b, s=s: gqa_decode(*inputs[b][:3], torch.tensor([s], device="cuda"),
                                                                 inputs[b][3], scale, "efficient")) for b, s in cases}
    grid = [(split, block, warps, stages) for split, block, warps, stages
            in itertools.product((128, 256, 512), (32, 64, 128), (2, 4, 8), (1, 2, 3)) if block <= split]
    for split, block, warps, stages in grid:
        options = dict(split=split, block=block, num_warps=warps, num_stages=stages)
        try:
            worst = 0.0
            for b, s in cases:
                q, k, v, start = inputs[b]
                slot = torch.tensor([s], device="cuda")
                out = kernels.gqa_decode(q, k, v, slot, start, scale, **options)
                pos = torch.arange(positions, device="cuda")
                mask = (pos[None] >= start[:, None]) & (pos[None] <= slot)
                ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                       attn_mask=mask[:, None, None], scale=scale)
                worst = max(worst, (out.float() - ref).abs().max().item())
            times = {f"{b}@{s}": timed(lambda b=b, s=s, options=options: kernels.gqa_decode(
                *inputs[b][:3], torch.tensor([s], device="cuda"), inputs[b][3], scale, **options)) for b, s in cases}
        except Exception as error:  # a tile that does not fit the GPU's shared memory
            rows.append({**options, "error": f"{type(error).__name__}: {str(error)[:120]}"})
            continue
        mean101 = sum(t for c, t in times.items() if c.startswith("101@")) / len(slots)
        rows.append({**options, "worst_error": worst, "ms": {c: round(t, 4) for c, t in times.items()},
                     "mean_101_ms": round(mean101, 4)})
    good = sorted((r for r in rows if "mean_101_ms" in r), key=lambda r: r["mean_101_ms"])
    print(f"baseline (efficient, whole cache): {json.dumps({c: round(t, 4) for c, t in baseline.items()})}")
    print(f"module defaults: split {kernels.SPLIT}, block {kernels.BLOCK}, warps {kernels.NUM_WARPS}, "
          f"stages {kernels.NUM_STAGES}")
    for r in good[:15]:
        print(r)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel-tune.json").write_text(json.dumps({
        "gpu": torch.cuda.get_device_name(), "baseline_ms": baseline, "configs": rows}, indent=1))


if __name__ == "__main__":
    main()
