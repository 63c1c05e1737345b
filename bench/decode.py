"""The decode section: where an evaluate job's generation time goes, at the batch the chain uses (101 rows).

Three workers, each a new process as an evaluate job is: the first on an empty compile cache (on a fresh machine,
what the chain's evaluate-before pays), the second on another empty one (the same compile on a machine that has
compiled once), the third on the first one's cache (what evaluate-after pays). Each reports its first short
generate (prefill, compilation, CUDA-graph capture) with torch's own breakdown of the compile time
(`torch._dynamo.utils.compile_times`). The first also times steady decoding with and without the evaluate job's
per-step progress streamer, and profiles a few steps (the GPU kernels by time, and the wall time per step against
the GPU's busy time), keeping the trace.
"""

from __future__ import annotations

import gzip
import random
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import Session, base_overrides, write_result
from bench.model import N_SPECIAL


def _prompts(spec: dict, n: int) -> list[str]:
    from medcot.prompts import inference_prompt

    rng = random.Random(0)
    n_words = spec["arch"]["vocab_size"] - N_SPECIAL
    return [inference_prompt(" ".join(f"w{rng.randrange(n_words - 200)}" for _ in range(rng.randint(40, 120))))
            for _ in range(n)]


def worker_decode(spec: dict) -> None:
    t_process = time.monotonic()
    import torch

    from medcot.cli import setup_logging
    from medcot.config import load_config
    from medcot.modeling import plan_eval_model, select_backend

    setup_logging()
    out: dict[str, Any] = {"label": spec["label"], "import_s": round(time.monotonic() - t_process, 1)}
    config = load_config(None, base_overrides({**spec, "backend": "transformers"}) + ["eval.weights=16bit"])
    model_config, _ = plan_eval_model(config)
    runtime = select_backend(model_config)
    from medcot.evaluate import generate
    from medcot.modeling import load_with_adapter

    t0 = time.monotonic()
    model, tokenizer = load_with_adapter(config, runtime, None)
    out["load_s"] = round(time.monotonic() - t0, 1)
    prompts = _prompts(spec, spec["batch"])
    batch = len(prompts)

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def run(tokens: int, streamer: bool = True) -> dict[str, Any]:
        stats: dict[str, float] = {}
        sync()
        t = time.monotonic()
        if streamer:
            generate(model, tokenizer, prompts, max_new_tokens=tokens, min_new_tokens=tokens, batch_size=batch, stats=stats)
        else:
            tokenizer.padding_side = "left"
            enc = tokenizer(sorted(prompts, key=len, reverse=True), return_tensors="pt", padding=True).to(model.device)
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        sync()
        return {"tokens": tokens, "streamer": streamer, "wall_s": round(time.monotonic() - t, 2), **stats}

    out["first"] = run(32)
    from torch._dynamo.utils import compile_times

    out["compile_times"] = compile_times(repr="str", aggregate=True)
    out["seconds_to_first_answer"] = round(time.monotonic() - t_process, 1)
    write_result(spec["result"], out)
    if not spec.get("profile"):
        return
    steady = spec["steady_tokens"]
    out["steady"] = run(steady)
    out["steady"]["step_ms"] = round(1000 * out["steady"]["wall_s"] / steady, 2)
    out["steady_no_streamer"] = run(steady, streamer=False)
    out["steady_no_streamer"]["step_ms"] = round(1000 * out["steady_no_streamer"]["wall_s"] / steady, 2)
    write_result(spec["result"], out)

    from torch.profiler import ProfilerActivity, profile

    steps = 24
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(steps)
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)
    busy_us = sum(e.self_device_time_total for e in kernels)
    out["profile"] = {
        "steps": steps, "gpu_busy_ms_per_step": round(busy_us / 1000 / steps, 2),
        "kernels": [{"name": e.key[:140], "calls": e.count, "ms_per_step": round(e.self_device_time_total / 1000 / steps, 3)}
                    for e in kernels[:25]],
        "cpu_ops": [{"name": e.key[:100], "calls": e.count, "ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 3)}
                    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]],
    }
    trace = Path(spec["out_dir"]) / "decode-trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    write_result(spec["result"], out)


def run_section(session: Session, name: str) -> None:
    args = session.args
    out_dir = Path(args.out)
    first_cache = session.work / "compile-decode-a"
    runs = [("first on this machine, empty cache", first_cache, True),
            ("empty cache, machine warm", session.work / "compile-decode-b", False),
            ("the first run's cache", first_cache, False)]
    shutil.rmtree(first_cache, ignore_errors=True)
    shutil.rmtree(session.work / "compile-decode-b", ignore_errors=True)
    results = session.results.setdefault("decode", {})
    for label, cache, do_profile in runs:
        spec = {**session.common, "label": label, "batch": 8 if args.tiny else 101, "profile": do_profile,
                "steady_tokens": 16 if args.tiny else 300, "out_dir": str(out_dir), "env": {"MEDCOT_COMPILE_CACHE": str(cache)}}
        results[label] = session.worker("decode", spec, f"decode {label}", cap_s=400)
        session.save()
