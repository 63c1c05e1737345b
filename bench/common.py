"""What every section shares: the session (arguments, deadline, log, results), worker subprocesses (re-runs of
bench/run.py with --worker KIND --spec JSON) and their result files, the environment record and merging results."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "run.py"  # what a worker process runs


@dataclass
class Session:
    """One benchmark run as its sections see it. `common` starts every worker's spec (model folder, work folder,
    architecture); `save` writes the results JSON and BENCHMARKS.md, after every measurement."""

    args: argparse.Namespace
    work: Path
    model_dir: Path
    deadline: float
    log: IO[str]
    common: dict[str, Any]
    results: dict[str, Any]
    save: Callable[[], None]

    def worker(self, kind: str, spec: dict, label: str, cap_s: float | None = None) -> dict:
        return run_worker(kind, spec, self.work, self.deadline, self.log, label, cap_s)


def write_result(path: str, data: Any) -> None:
    """A worker's result file, replaced whole (what it measured so far survives a time limit)."""
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def stop_after(steps: int):
    """Stopping criteria for `generate` that end it after `steps` decoding steps, whatever max_new_tokens says (which
    sizes the static KV cache, and so the compiled step): a short run of the full-length shapes."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfter(StoppingCriteria):
        def __init__(self) -> None:
            self.calls = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            return self.calls >= steps

    return StoppingCriteriaList([StopAfter()])


def base_overrides(spec: dict) -> list[str]:
    """Config overrides of the train and eval workers: the built model, 4-bit, the recipe's length, no tracking."""
    return [
        f"model.name={spec['model_dir']}", f"model.backend={spec['backend']}", "model.load_in_4bit=true",
        "model.max_seq_length=2048", f"output_dir={spec['work']}", "run_name=bench", "tracking.report_to=none",
    ]


def file_count(folder: Path) -> int:
    """Files under `folder` (a compile cache: 0 = the job that starts now compiles everything)."""
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def run_command(cmd: list[str], deadline: float, log, label: str, cap_s: float | None = None,
                extra_env: dict[str, str] | None = None) -> int | str:
    """Run a command with its output appended to the log; stop it at the deadline (or its own cap)."""
    left = deadline - time.monotonic()
    timeout = min(left, cap_s) if cap_s else left
    if timeout < 20:
        log.write(f"\n=== {label}: skipped, {left:.0f} s left before the deadline\n")
        log.flush()
        return "skipped"
    log.write(f"\n=== {label}: {' '.join(cmd[-4:])[:300]} (limit {timeout:.0f} s)\n")
    log.flush()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout)
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        rc = f"timed out after {timeout:.0f} s"
    log.write(f"=== {label}: exit {rc} after {time.monotonic() - t0:.0f} s\n")
    log.flush()
    print(f"{label}: exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)
    return rc


def run_worker(kind: str, spec: dict, work: Path, deadline: float, log, label: str, cap_s: float | None = None) -> dict:
    """`bench/run.py --worker KIND --spec JSON` in a fresh process; what it wrote, plus its exit when not 0."""
    result = work / f"result-{label.replace(' ', '-').replace(':', '-')}.json"
    result.unlink(missing_ok=True)
    spec = {**spec, "result": str(result)}
    rc = run_command([sys.executable, str(SCRIPT), "--worker", kind, "--spec", json.dumps(spec)], deadline, log, label,
                     cap_s, spec.get("env"))
    data = json.loads(result.read_text()) if result.is_file() else {}
    if rc != 0:
        data["exit"] = rc
    return data


def lock_differences() -> dict[str, dict[str, str | None]]:
    """Packages of docker/requirements.lock (the image's pins) installed here at another version, or not at all:
    {name: {"lock": version, "installed": version or None}}. What these numbers ran on beyond the image."""
    from importlib.metadata import PackageNotFoundError, version

    lock = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / "docker" / "requirements.lock").read_text(), re.M)
    found: dict[str, dict[str, str | None]] = {}
    for name, pinned in lock:
        try:
            installed: str | None = version(name)
        except PackageNotFoundError:
            installed = None
        # A local build tag (torch's "+cu130") names how the same version was built.
        if installed is None or installed.split("+")[0] != pinned:
            found[name] = {"lock": pinned, "installed": installed}
    return found


def environment() -> dict[str, Any]:
    """The results' meta record: date, Python, package versions, differences from the lock, GPU and driver."""
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"date": dt.date.today().isoformat(), "python": platform.python_version(), "versions": {},
                            "lock_differences": lock_differences()}
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "accelerate", "datasets", "triton"):
        with contextlib.suppress(PackageNotFoundError):
            info["versions"][pkg] = version(pkg)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
        info["gpu"], info["driver"], info["gpu_memory"] = (x.strip() for x in smi.split(","))
    except (OSError, subprocess.CalledProcessError, IndexError):
        info["gpu"] = "unknown"
    return info


def merge_results(parts: list[dict]) -> dict:
    """Results of several runs (a second run of a day on the same GPU adds to the first): later runs replace the same
    measurement."""
    merged: dict[str, Any] = {"meta": {}, "peak": {}, "build": {}, "chain": {}, "chain_variants": {}, "train": {},
                              "reference": {}, "eval": {}, "decode": {}}
    for part in parts:
        merged["meta"] = {**merged["meta"], **part.get("meta", {})}
        merged["peak"] = part.get("peak") or merged["peak"]
        merged["chain_variants"].update(part.get("chain_variants", {}))
        chain = part.get("chain") or {}
        if chain.get("overrides"):  # a chain run with settings other than the recipe's: shown apart, never judged
            merged["chain_variants"][", ".join(chain["overrides"])] = chain
        elif chain:
            merged["chain"] = chain
        if part.get("build") and not (part["build"].get("reused") and merged["build"]):  # keep the timed build
            merged["build"] = part["build"]
        for key in ("train", "eval", "decode"):
            merged[key].update(part.get(key, {}))
        for variant, entry in part.get("reference", {}).items():
            # The same variant on a compile cache in another state (the first job of a new machine finds the shared
            # cache empty) is another measurement: the earlier one stays, named for its cache.
            earlier = merged["reference"].get(variant)
            if earlier and None not in (earlier.get("compile_cache"), entry.get("compile_cache")) \
                    and earlier["compile_cache"] != entry["compile_cache"]:
                merged["reference"][f"{variant} ({earlier['compile_cache']} cache)"] = earlier
            merged["reference"][variant] = entry
    return merged


def timed(fn, reps: int = 50) -> float:
    """Milliseconds per call of `fn` on the GPU (CUDA events over `reps` calls, after 3 warm-up calls)."""
    import torch

    for _ in range(3):
        fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / reps
