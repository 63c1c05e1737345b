"""The chain section: the five jobs as `docker compose up` runs them, each its own process, one after the other:
evaluate-before, train, merge, evaluate-after (the merged folder), push dry run. The recipe's config on the
synthetic rows (500 trained, 100 held out, the reference section's rows), timed from each process's start to its
exit and as a whole, from the first start to the last exit.

For each stage, what it spent before its own work began (start-up: Python, imports, CUDA, the config; the wall
time less the stage's manifest duration) and on compilation: the train job's first step beyond a steady one, an
evaluate job's prefill and first decoding steps beyond steady ones. Every job shares one compile cache folder
(MEDCOT_COMPILE_CACHE, the bench's --compile-cache), as the containers share the hf-cache volume; with
--chain-without-cache, evaluate-after then runs again on an empty one, which is what each evaluate job paid before
the cache (the decode section measures the same compile with and without the cache more directly).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, Session, file_count, run_command
from bench.reference import reference_rows
from medcot.push import PLAN_FILE

JOBS = (
    ("eval-before", ["jobs/evaluate.py", "--stage", "before"]),
    ("train", ["jobs/train.py"]),
    ("merge", ["jobs/merge.py"]),
    ("eval-after", ["jobs/evaluate.py", "--stage", "after"]),
    ("push-dry-run", ["jobs/push.py", "--dry-run"]),
)
TRAIN_ROWS, HELDOUT_ROWS = 500, 100


def chain_config(session: Session, run_name: str) -> tuple[Path, Path]:
    """(config file, run folder): the recipe's config on the synthetic rows; the first 500 are the reference's."""
    import yaml
    from transformers import AutoTokenizer

    tiny = session.args.tiny
    n_train, n_heldout = (40, 8) if tiny else (TRAIN_ROWS, HELDOUT_ROWS)
    data = session.work / f"chain-{n_train}+{n_heldout}.jsonl"
    if not data.is_file():
        rows = reference_rows(AutoTokenizer.from_pretrained(session.model_dir), n_train + n_heldout)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = yaml.safe_load((ROOT / "configs" / "deepseek-r1-distill-llama-8b-medical.yaml").read_text())
    config.update(run_name=run_name, output_dir=str(session.work / "chain"))
    config["model"].update(name=str(session.model_dir))
    config["data"].update(path=str(data), name=None, train_rows=n_train, heldout_rows=n_heldout)
    config["tracking"]["report_to"] = "none"
    if tiny:
        config["training"].update(max_steps=6, save_steps=3)
        config["eval"].update(max_new_tokens=32)
    path = session.work / f"chain-{run_name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, Path(config["output_dir"]) / run_name


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def stage_entry(run_dir: Path, stage: str, wall_s: float, rc: int | str, cache_files: int) -> dict[str, Any]:
    """What one job did and where its time went, from its manifest and summary."""
    manifest = _read(run_dir / stage / "manifest.json")
    entry: dict[str, Any] = {"exit": rc, "wall_s": round(wall_s, 1), "compile_cache_files_before": cache_files}
    if manifest:
        entry.update(stage_s=manifest["duration_s"], startup_s=round(wall_s - manifest["duration_s"], 1))
    summary = _read(run_dir / stage / "summary.json")
    if stage.startswith("eval-") and summary:
        entry.update(compile_s=summary.get("decode_warmup_seconds"), load_s=summary.get("load_seconds"),
                     questions=summary.get("n_generated"), batch_size=summary.get("batch_size"),
                     batch_size_why=summary.get("batch_size_why"), weights=summary.get("weights"),
                     generation_s=summary.get("generation_seconds"),
                     generated_tokens=summary.get("generated_tokens"),
                     tokens_per_s=summary.get("generated_tokens_per_s"), step_s=summary.get("decode_step_seconds"),
                     decode_compiled=summary.get("decode_compiled"))
    if stage == "train" and summary:
        first, median = summary.get("first_step_s"), summary.get("median_step_s")
        entry.update(load_s=summary.get("model_load_s"), train_s=summary.get("train_runtime_s"),
                     steps=summary.get("global_step"), first_step_s=first, median_step_s=median,
                     compile_s=round(first - median, 1) if first is not None and median is not None else None,
                     tokens_per_s=summary.get("train_tokens_per_s"), checkpointing=summary.get("gradient_checkpointing"),
                     torch_compile_s=summary.get("torch_compile_s"), torch_compiled_frames=summary.get("torch_compiled_frames"),
                     losses=[x["loss"] for x in summary.get("losses", [])])
    if stage == "merge" and manifest:
        entry.update(bytes=(manifest.get("extra") or {}).get("bytes"))
    if stage == "push-dry-run":
        plan = _read(run_dir / stage / PLAN_FILE)
        entry.update(bytes=sum(f["size"] for c in plan.get("commits", []) for f in c.get("files", [])) or None)
    return entry


def run_section(session: Session, name: str) -> None:
    """The chain once (then, with --chain-without-cache, evaluate-after again without the compile cache)."""
    cache = Path(session.args.compile_cache)
    config, run_dir = chain_config(session, "chain")
    shutil.rmtree(run_dir, ignore_errors=True)  # every stage runs; none is skipped as already finished
    # --chain-overrides: KEY=VALUE settings given to every job on its command line, as a user would.
    overrides = [o for o in (session.args.chain_overrides or "").split(",") if o]
    out: dict[str, Any] = {"compile_cache": str(cache), "overrides": overrides, "stages": {}}
    session.results["chain"] = out
    first = time.monotonic()
    for stage, script in JOBS:
        files = file_count(cache)
        t0 = time.monotonic()
        rc = run_command([sys.executable, str(ROOT / script[0]), *script[1:], "--config", str(config), *overrides],
                         session.deadline, session.log, f"chain {stage}", cap_s=900)
        out["stages"][stage] = stage_entry(run_dir, stage, time.monotonic() - t0, rc, files)
        session.save()
        if rc != 0:
            break
    else:
        out["wall_s"] = round(time.monotonic() - first, 1)
    session.save()
    if out.get("wall_s") is None or not session.args.chain_without_cache:
        return
    empty = session.work / "compile-empty"
    shutil.rmtree(empty, ignore_errors=True)
    shutil.rmtree(run_dir / "eval-after")  # a finished stage with the same config would be skipped, --force or not
    t0 = time.monotonic()
    rc = run_command([sys.executable, str(ROOT / "jobs/evaluate.py"), "--stage", "after", "--config", str(config),
                      *overrides],
                     session.deadline, session.log, "chain eval-after without the compile cache", cap_s=600,
                     extra_env={"MEDCOT_COMPILE_CACHE": str(empty)})
    out["eval_after_without_cache"] = stage_entry(run_dir, "eval-after", time.monotonic() - t0, rc, 0)
    session.save()
