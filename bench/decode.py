"""The decode section: where an evaluate job's generation time goes, at the batch the chain uses (101 rows).

One worker per value of --decode-kernels ([eval.decoder:]eval.decode_kernel[:eager], e.g. `triton`,
`transformers:efficient`, `graph:triton:eager` for eval.decode_compile false),
each a new process on an empty compile cache of its own, as an evaluate job is: the evaluate job's `generate` in full
(1,200 tokens), reporting the compile (prefill, compilation, CUDA-graph capture beyond steady steps) with torch's own
breakdown of it (`torch._dynamo.utils.compile_times`) and the steady decoding step, then the same call once more in
that process (after a warm-up of the same shapes, as the evaluation target's baselines were measured). The first also profiles 30
steps (the GPU kernels by time per step; the trace is kept) and times the decoding attention alone (medcot.kernels against
PyTorch's memory-efficient kernel over the whole cache) at three cache positions. Then one more worker runs 40 steps
of the same shapes from the first one's cache: what a second evaluate job pays to compile.
"""

from __future__ import annotations

import gzip
import random
import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import Session, base_overrides, stop_after, timed, write_result
from bench.model import synthetic_prompts


def worker_decode(spec: dict) -> None:
    t_process = time.monotonic()
    import torch

    from medcot.cli import setup_logging
    from medcot.config import load_config
    from medcot.modeling import plan_eval_model, select_backend

    setup_logging()
    out: dict[str, Any] = {"label": spec["label"], "kernel": spec.get("kernel", "auto"),
                           "decoder": spec.get("decoder", "auto"), "import_s": round(time.monotonic() - t_process, 1)}
    config = load_config(None, base_overrides({**spec, "backend": "transformers"})
                         + ["eval.weights=16bit", f"eval.decode_kernel={spec.get('kernel', 'auto')}",
                            f"eval.decoder={spec.get('decoder', 'auto')}",
                            f"eval.decode_compile={str(spec.get('compile', True)).lower()}"])
    model_config, _ = plan_eval_model(config)
    runtime = select_backend(model_config)
    from medcot.generation import generate
    from medcot.modeling import load_with_adapter

    t0 = time.monotonic()
    model, tokenizer = load_with_adapter(config, runtime, None)
    out["load_s"] = round(time.monotonic() - t0, 1)
    prompts = synthetic_prompts(random.Random(0), spec["arch"]["vocab_size"], spec["batch"])
    batch, tokens = len(prompts), spec["new_tokens"]
    cuda = torch.cuda.is_available()

    from medcot.decoding import GraphDecoder
    from medcot.generation import choose_decoder

    decoder, _ = choose_decoder(config.eval.decoder, model, do_sample=False)

    def short(steps: int) -> float:
        """`steps` decoding steps of the full-length generate: the same static cache, so the same compiled step."""
        tokenizer.padding_side = "left"
        enc = tokenizer(sorted(prompts, key=len, reverse=True), return_tensors="pt", padding=True).to(model.device)
        t = time.monotonic()
        if decoder == "graph":
            graph = GraphDecoder(model, batch=batch, cache_len=enc["input_ids"].shape[1] + tokens, eos_ids=[],
                                 pad_id=tokenizer.pad_token_id, kernel=config.eval.decode_kernel,
                                 compile=config.eval.decode_compile)
            graph.run(enc["input_ids"], enc["attention_mask"], max_new_tokens=steps, min_new_tokens=steps)
            graph.close()
        else:
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None,
                               stopping_criteria=stop_after(steps))
        if cuda:
            torch.cuda.synchronize()
        return round(time.monotonic() - t, 2)

    if spec.get("full"):  # the evaluate job's generate: compile, then every step of the answers
        stats: dict[str, Any] = {}
        t = time.monotonic()
        rows, _ = generate(model, tokenizer, prompts, max_new_tokens=tokens, min_new_tokens=tokens, batch_size=batch,
                           stats=stats, decoder=config.eval.decoder, decode_kernel=config.eval.decode_kernel,
                           decode_compile=config.eval.decode_compile)
        wall = time.monotonic() - t
        out["full"] = {"tokens": tokens, "wall_s": round(wall, 2), **stats,
                       "steady_tokens_per_s": round(batch / stats["step_s"], 1) if stats.get("step_s") else None,
                       "tokens_per_s": round(sum(r["generated_tokens"] for r in rows) / wall, 1)}
        # The same call again in this process, as the evaluation target's baselines were measured: the whole generate call
        # (prefill, every step, early ends) after a warm-up of the same shapes, its compilation done.
        t = time.monotonic()
        rows, _ = generate(model, tokenizer, prompts, max_new_tokens=tokens, min_new_tokens=tokens, batch_size=batch,
                           decoder=config.eval.decoder, decode_kernel=config.eval.decode_kernel,
                           decode_compile=config.eval.decode_compile)
        wall = time.monotonic() - t
        generated = sum(r["generated_tokens"] for r in rows)
        out["warm"] = {"wall_s": round(wall, 2), "generated_tokens": generated,
                       "tokens_per_s": round(generated / wall, 1)}
    else:  # a few steps of the same shapes: what this process pays to compile (or load) the step
        out["first_40_steps_s"] = short(40)
    from torch._dynamo.utils import compile_times

    out["compile_times"] = compile_times(repr="str", aggregate=True)
    write_result(spec["result"], out)
    if not spec.get("profile"):
        return
    if cuda:
        out["attention_alone"] = attention_timings(batch, tokens)
        write_result(spec["result"], out)
    from torch.profiler import ProfilerActivity, profile

    steps = 30
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        short(steps)
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)
    out["profile"] = {
        "steps": steps, "gpu_busy_ms_per_step": round(sum(e.self_device_time_total for e in kernels) / 1000 / steps, 2),
        "kernels": [{"name": e.key[:140], "calls": e.count, "ms_per_step": round(e.self_device_time_total / 1000 / steps, 3)}
                    for e in kernels[:25]],
    }
    trace = Path(spec["out_dir"]) / "decode-trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    write_result(spec["result"], out)


def attention_timings(batch: int, tokens: int, prompt: int = 212) -> dict[str, Any]:
    """Milliseconds per call of the decoding step's attention, the 8B model's shapes (8 KV heads of 4 query heads,
    head size 128) over a cache of prompt + tokens positions, at the first, middle and last step: medcot.kernels
    over each row's valid positions, and PyTorch's memory-efficient kernel over the whole cache under a mask."""
    import torch

    from medcot.decoding import gqa_decode

    positions = prompt + tokens
    q = torch.randn(batch, 8, 4, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, 8, positions, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    start = torch.randint(0, 60, (batch,), device="cuda")
    out: dict[str, Any] = {"positions": positions}
    for slot in (prompt, prompt + tokens // 2, positions - 1):
        slot_t = torch.tensor([slot], device="cuda")
        for kernel in ("triton", "efficient"):
            out[f"{kernel}@{slot}"] = round(timed(lambda kernel=kernel, slot_t=slot_t: gqa_decode(
                q, k, v, slot_t, start, 0.088, kernel)), 4)
    return out


def parse_run(run: str) -> tuple[str, str, bool]:
    """A --decode-kernels value, `[DECODER:]KERNEL[:eager]` -> (eval.decoder, eval.decode_kernel,
    eval.decode_compile): `eager` replays the decoder layers uncompiled."""
    parts = run.split(":")
    compiled = "eager" not in parts
    parts = [p for p in parts if p != "eager"]
    return (parts[0] if len(parts) > 1 else "auto"), parts[-1], compiled


def _label(decoder: str, kernel: str, compiled: bool) -> str:
    return f"{decoder}:{kernel}" + ("" if compiled else ", layer not compiled")


def run_section(session: Session, name: str) -> None:
    args = session.args
    out_dir = Path(args.out)
    kernels = args.decode_kernels.split(",")
    caches = {k: session.work / f"compile-decode-{k.replace(':', '-')}" for k in kernels}
    for cache in caches.values():
        shutil.rmtree(cache, ignore_errors=True)
    # Labels name the decoder: rows of the graph decoder and of transformers' generate stay apart in the tables.
    named = {k: _label(*parse_run(k)) for k in kernels}
    runs = [(f"empty cache, {named[k]}", k, {"full": True, "profile": i == 0}) for i, k in enumerate(kernels)]
    runs.append((f"the first run's cache, {named[kernels[0]]}", kernels[0], {}))
    results = session.results.setdefault("decode", {})
    for label, kernel, what in runs:
        decoder, kernel_name, compiled = parse_run(kernel)
        spec = {**session.common, **what, "label": label, "kernel": kernel_name, "decoder": decoder, "compile": compiled,
                "batch": 8 if args.tiny else 101,
                "new_tokens": 48 if args.tiny else 1200, "out_dir": str(out_dir),
                "env": {"MEDCOT_COMPILE_CACHE": str(caches[kernel])}}
        results[label] = session.worker("decode", spec, f"decode {label}", cap_s=400)
        session.save()
