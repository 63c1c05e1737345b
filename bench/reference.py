"""The reference section: the train job itself (`jobs/train.py --config FILE` in a subprocess) on the recipe's
config with synthetic rows of realistic token lengths, timed from start to exit."""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Session, file_count, run_command
from bench.model import N_SPECIAL

# Token lengths of the synthetic reference rows: medical-o1-reasoning-SFT (en) rows average about 1,000
# tokens with the R1 tokenizer and have a long right tail. Log-normal with median 900 and sigma 0.46 has
# mean 900 * exp(0.46**2 / 2) = 1,000; clipped to [300, 2048] (2048 = the recipe's max_seq_length).
REF_MEDIAN, REF_SIGMA, REF_MIN, REF_MAX = 900, 0.46, 300, 2048


def reference_rows(tokenizer, n: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows in the dataset's columns whose training text (template + EOS) is exactly the drawn token length."""
    from medcot.data import Example, tokenize_example

    rng = random.Random(seed)
    n_words = len(tokenizer) - N_SPECIAL

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(n_words - 200)}" for _ in range(k))

    rows = []
    for _ in range(n):
        target = int(min(REF_MAX, max(REF_MIN, round(rng.lognormvariate(math.log(REF_MEDIAN), REF_SIGMA)))))
        question, response = words(rng.randint(20, 60)), words(rng.randint(20, min(160, target // 4)))
        overhead = len(tokenize_example(Example(question, "w0", response, 0), tokenizer)["input_ids"]) - 1
        cot = words(target - overhead)
        assert len(tokenize_example(Example(question, cot, response, 0), tokenizer)["input_ids"]) == target
        rows.append({"Question": question, "Complex_CoT": cot, "Response": response, "tokens": target})
    return rows


def run_reference(args, model_dir: Path, work: Path, variant: str, deadline: float, log) -> dict[str, Any]:
    """`jobs/train.py --config FILE` on the recipe's config with the synthetic rows; wall time from the
    command's start to its exit (import, data preparation, model load, 60 steps, checkpoints, adapter save)."""
    import yaml
    from transformers import AutoTokenizer

    micro, accum, gc, training_keys = _parse_ref_variant(variant)
    n_rows = 40 if args.tiny else 500
    data = work / f"reference-{n_rows}.jsonl"
    if not data.is_file():
        rows = reference_rows(AutoTokenizer.from_pretrained(model_dir), n_rows)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = [json.loads(line)["tokens"] for line in data.read_text().splitlines()]
    config = yaml.safe_load((ROOT / "configs" / "deepseek-r1-distill-llama-8b-medical.yaml").read_text())
    config.update(run_name=f"reference-{variant.replace(':', '-')}", output_dir=str(work / "reference"))
    config["model"].update(name=str(model_dir))
    config["data"].update(path=str(data), name=None, train_rows=n_rows, heldout_rows=0)
    config["lora"]["use_gradient_checkpointing"] = gc
    config["training"].update(training_keys)
    config["training"].update(per_device_train_batch_size=micro, gradient_accumulation_steps=accum, logging_steps=1)
    if args.tiny:
        config["training"].update(max_steps=6, save_steps=3)
    config["tracking"]["report_to"] = "none"
    cfg_path = work / f"reference-{variant.replace(':', '-')}.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_dir = Path(config["output_dir"]) / config["run_name"]
    shutil.rmtree(run_dir, ignore_errors=True)  # each variant trains from scratch, never resumes

    entry: dict[str, Any] = {"variant": variant, "micro_batch": micro, "accumulation": accum, "gc": gc, "training": training_keys,
                             "rows": n_rows, "row_tokens": {"mean": round(statistics.mean(lengths)),
                                                            "median": statistics.median(lengths), "max": max(lengths)}}
    # cold: an empty compile cache of its own, as on a new machine; otherwise the session's, which earlier jobs
    # filled (or not: the first job of a benchmark run on a new machine finds it empty, and is judged as such).
    cold = "cold" in variant.split(":")[2:]
    cache = work / f"compile-empty-{variant.replace(':', '-')}" if cold else Path(args.compile_cache)
    env = {"MEDCOT_COMPILE_CACHE": str(cache)} if cold else {}
    # Flags that switch one of the job's own speed-ups off, to measure it: the variable set to 0, an entry key False.
    for flag in variant.split(":")[2:]:
        if flag in SWITCHED_OFF:
            variable, key = SWITCHED_OFF[flag]
            env[variable] = "0"
            entry[key] = False
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    entry["compile_cache_files_before"] = file_count(cache)
    entry["compile_cache"] = "shared" if entry["compile_cache_files_before"] else "empty"
    # profile: the same job under cProfile, for where its start-up and first step go (the wall time is not
    # comparable: the profiler slows Python); the summary of the profile goes into the entry.
    profile = "profile" in variant.split(":")[2:]
    prof = work / f"reference-{variant.replace(':', '-')}.prof"
    cmd = [sys.executable, *(["-m", "cProfile", "-o", str(prof)] if profile else []), str(ROOT / "jobs" / "train.py"),
           "--config", str(cfg_path)]
    t0 = time.monotonic()
    rc = run_command(cmd, deadline, log, f"reference {variant}", extra_env=env or None)
    entry["wall_s"] = round(time.monotonic() - t0, 1)
    entry["exit_code"] = rc
    summary_path = run_dir / "train" / "summary.json"
    if rc == 0 and summary_path.is_file():
        s = json.loads(summary_path.read_text())
        entry.update(model_load_s=s.get("model_load_s"), train_s=s["train_runtime_s"], train_tokens=s["train_tokens"],
                     tokens_per_s=s["train_tokens_per_s"], peak_memory_gib=s["peak_memory_gib"], steps=s["global_step"],
                     losses=[x["loss"] for x in s["losses"]], adapter=str(run_dir / "train" / "adapter"),
                     checkpointing=s.get("gradient_checkpointing"), first_step_s=s.get("first_step_s"),
                     median_step_s=s.get("median_step_s"), torch_compile_s=s.get("torch_compile_s"),
                     torch_compiled_frames=s.get("torch_compiled_frames"), data_s=s.get("data_s"),
                     trainer_setup_s=s.get("trainer_setup_s"), padding_free=s.get("padding_free"))
        manifest = run_dir / "train" / "manifest.json"
        if manifest.is_file():  # before the stage's own work began: interpreter, imports (Unsloth's), CUDA, config
            entry["startup_s"] = round(entry["wall_s"] - json.loads(manifest.read_text())["duration_s"], 1)
    if profile and prof.is_file():
        entry["profile"] = profile_text(prof)
    return entry


def profile_text(path: Path, top: int = 60) -> str:
    """The profile's functions by cumulative time, then by their own time: small enough to keep in the results."""
    import io
    import pstats

    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top // 2)
    return out.getvalue()


# nofreeze: without the gc.freeze() of the imports' heap (medcot.training.SetupHeap); alltrainers: Unsloth rewrites
# every TRL trainer at its import, not the SFT trainer alone (medcot.unsloth_trainers).
SWITCHED_OFF = {"nofreeze": ("MEDCOT_GC_FREEZE", "gc_freeze"), "alltrainers": ("MEDCOT_UNSLOTH_SFT_ONLY", "unsloth_sft_only")}

REF_FLAGS: dict[str, dict[str, Any]] = {
    "padded": {"padding_free": False}, "padding_free": {"padding_free": True},
    "rebalance": {"sampling": "batch_rebalance"}, "grouped": {"sampling": "group_by_length"}, "cold": {}, "profile": {},
    "nofreeze": {}, "alltrainers": {},
}


def _parse_ref_variant(variant: str) -> tuple[int, int, Any, dict[str, Any]]:
    """'8x1:true:padded:rebalance' -> micro-batch 8, accumulation 1, use_gradient_checkpointing True, and the
    training keys of the flags: padded / padding_free (training.padding_free), rebalance / grouped
    (training.sampling: batch_rebalance / group_by_length)."""
    parts = variant.split(":")
    micro, accum = (int(x) for x in parts[0].split("x"))
    gc = parts[1] if len(parts) > 1 else "unsloth"
    gc_value: Any = {"true": True, "false": False}.get(gc, gc)
    keys: dict[str, Any] = {}
    for flag in parts[2:]:
        keys.update(REF_FLAGS[flag])
    return micro, accum, gc_value, keys


def run_section(session: Session, name: str) -> None:
    """One train job per variant of --reference."""
    for variant in session.args.reference.split(","):
        session.results["reference"][variant] = run_reference(session.args, session.model_dir, session.work, variant,
                                                              session.deadline, session.log)
        session.save()
