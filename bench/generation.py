"""The eval section: generated tokens/s of the evaluate job's `generate` per variant (backend, 4-bit or
16-bit weights, attention) and batch size, with a reference run's adapter when the work folder has one."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from bench.common import Session, base_overrides, stop_after, write_result
from bench.model import synthetic_prompts


def worker_eval(spec: dict) -> None:
    """Generated tokens/s at each batch size, `min_new_tokens = max_new_tokens` so every row generates
    the full length (random weights emit EOS at random). A short warm-up with the same shapes first."""
    import torch

    from medcot.cli import setup_logging
    from medcot.config import load_config
    from medcot.modeling import plan_eval_model, select_backend

    setup_logging()
    variant = spec["variant"]
    backend = "unsloth" if variant.startswith("unsloth") else "transformers"
    weights = "4bit" if "4bit" in variant else "16bit"
    # The baseline is plain transformers: its SDPA copies the KV cache to every query head (medcot.attention).
    attention = "sdpa" if variant.endswith("-sdpa") or variant == "transformers-4bit" else "auto"
    config = load_config(None, base_overrides({**spec, "backend": backend})
                         + [f"eval.weights={weights}", f"eval.attention={attention}"])
    model_config, _ = plan_eval_model(config)  # what jobs/evaluate.py does before it picks the backend
    runtime = select_backend(model_config)  # imports Unsloth, when chosen, before transformers

    from medcot.generation import generate
    from medcot.modeling import load_with_adapter

    t0 = time.monotonic()
    adapter = Path(spec["adapter"]) if spec.get("adapter") else None
    model, tokenizer = load_with_adapter(config, runtime, adapter)  # 16-bit: adapter merged, static KV cache
    out: dict[str, Any] = {"variant": variant, "backend": runtime.backend, "adapter": str(adapter) if adapter else None,
                           "attention": None if runtime.backend == "unsloth" else model.config._attn_implementation,
                           "load_s": round(time.monotonic() - t0, 1), "batches": []}

    rng = random.Random(0)
    new_tokens = spec["new_tokens"]
    for batch in spec["batches"]:
        prompts = synthetic_prompts(rng, spec["arch"]["vocab_size"], batch)
        entry: dict[str, Any] = {"batch": batch, "new_tokens": new_tokens}
        try:
            tokenizer.padding_side = "left"
            enc = tokenizer(sorted(prompts, key=len, reverse=True), return_tensors="pt", padding=True).to(model.device)
            warm = time.monotonic()
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, stopping_criteria=stop_after(16))
            entry["warmup_s"] = round(time.monotonic() - warm, 1)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            rows, seconds = generate(model, tokenizer, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     batch_size=batch)
            generated = sum(r["generated_tokens"] for r in rows)
            entry.update(seconds=round(seconds, 2), generated_tokens=generated, tokens_per_s=round(generated / seconds, 1),
                         peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
                         prompt_tokens=[min(r["prompt_tokens"] for r in rows), max(r["prompt_tokens"] for r in rows)])
        except torch.cuda.OutOfMemoryError:
            entry["error"] = "CUDA out of memory"
            torch.cuda.empty_cache()
        out["batches"].append(entry)
        write_result(spec["result"], out)


def run_section(session: Session, name: str) -> None:
    """One worker per variant of --eval."""
    args = session.args
    # A reference run's trained adapter, when this work folder has one: the evaluate job's "after" case.
    adapters = sorted((session.work / "reference").glob("reference-*/train/adapter"))
    adapter = str(adapters[0]) if adapters else None
    for variant in args.eval.split(","):
        variant, _, tokens_text = variant.partition(":")  # "unsloth-4bit:256": its own answer length
        tokens = int(tokens_text) if tokens_text else (
            args.baseline_new_tokens if variant == "transformers-4bit" else args.new_tokens)
        spec = {**session.common, "variant": variant, "batches": [int(b) for b in args.eval_batches.split(",")],
                "new_tokens": tokens, "adapter": adapter}
        session.results["eval"][f"{variant}:{tokens}"] = session.worker("eval", spec, f"eval {variant}", cap_s=600)
        session.save()
