"""The peak section: this GPU's bf16 matmul rate, the denominator of MFU."""

from __future__ import annotations

import statistics

from bench.common import Session, write_result


def worker_peak(spec: dict) -> None:
    """bf16 matmul rate of this GPU: median of 30 timed 8192^3 products after warm-up (CUDA events)."""
    import torch

    n = 8192
    pairs = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16))
             for _ in range(2)]
    for a, b in pairs * 5:
        a @ b
    times = []
    for i in range(30):
        a, b = pairs[i % 2]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    median = statistics.median(times)
    write_result(spec["result"], {"matmul_bf16_tflops": round(2 * n**3 / median / 1e12, 1), "n": n, "median_ms": round(median * 1e3, 3)})


def run_section(session: Session, name: str) -> None:
    """Section peak: one worker."""
    session.results["peak"] = session.worker("peak", session.common, "peak", cap_s=120)
