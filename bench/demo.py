"""`make demo` timed job by job on this machine (a CPU), with the key numbers of its report.

    python3 bench/demo.py                 # the demo's jobs in this checkout (its .venv; setup not timed)
    python3 bench/demo.py --clean-clone   # as a new user: clone HEAD, `make setup` without caches, then the jobs

Runs the commands that `make -n demo` prints, each timed from its start to its exit, in a run of its own
(RUN_NAME=bench-demo-<time>). Prints the stage times and the report's numbers (report/comparison.json): format
and think-closed rates with their exact McNemar tests, the held-out loss intervals, how many multiple-choice
answers parse, ROUGE-L's paired difference. Writes bench/results/<date>-cpu-demo-<cpu>.json, then BENCHMARKS.md
from the results (its "The CPU demo" section shows this run). Targets (bench.render.DEMO_TARGETS): setup <= 180 s,
the jobs <= 300 s, format and think-closed p < 0.05 on >= 20 questions, disjoint loss intervals, most multiple-choice
answers parse.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.render import load_parts, page_sources, render_demo, write_benchmarks_md  # noqa: E402


def cpu_name() -> str:
    """The CPU's name, its core count and the widest matrix or vector unit that decides medcot's CPU dtype."""
    info = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), []))
    unit = next((name for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                                         ("avx2", "AVX2")) if flag in flags), "no AVX2")
    return f"{model}, {os.cpu_count()} cores, {unit}"


def demo_commands(checkout: Path, run_name: str, env: dict[str, str]) -> list[list[str]]:
    """The job commands of `make demo`, as make would run them (setup already done)."""
    out = subprocess.run(["make", "-n", "demo", f"RUN_NAME={run_name}"], cwd=checkout, env=env, capture_output=True,
                         text=True, check=True).stdout
    commands = [shlex.split(line) for line in out.splitlines() if "jobs/" in line]
    if len(commands) < 5:
        raise SystemExit(f"`make -n demo` printed {len(commands)} job commands; is `make setup` done?\n{out}")
    return commands


def run_demo(checkout: Path, env: dict[str, str]) -> dict[str, Any]:
    run_name = f"bench-demo-{dt.datetime.now():%Y%m%d-%H%M%S}"
    jobs: list[dict[str, Any]] = []
    first = time.monotonic()
    for cmd in demo_commands(checkout, run_name, env):
        label = Path(cmd[1]).stem + ("-" + cmd[cmd.index("--stage") + 1] if "--stage" in cmd else "")
        label += "-dry-run" if "--dry-run" in cmd else ""
        t0 = time.monotonic()
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
        jobs.append({"job": label, "wall_s": round(time.monotonic() - t0, 1), "exit": proc.returncode})
        print(f"  {label:<16} {jobs[-1]['wall_s']:7.1f} s  exit {proc.returncode}", flush=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            break
    result: dict[str, Any] = {"run_name": run_name, "jobs": jobs, "jobs_s": round(time.monotonic() - first, 1)}
    comparison = checkout / "outputs" / run_name / "report" / "comparison.json"
    if comparison.is_file():
        result["report"] = key_numbers(json.loads(comparison.read_text()))
    return result


def key_numbers(comparison: dict[str, Any]) -> dict[str, Any]:
    """What the demo's targets judge it by, from the report's comparison.json."""
    metrics = {row["metric"]: row for row in comparison["metrics"]}
    tests = {t["metric"]: t for t in comparison["paired_tests"]}
    out: dict[str, Any] = {"questions": comparison["n"]["after"]}
    for name, metric in (("format", "format rate"), ("think closed", "think closed rate")):
        row, test = metrics[metric], tests.get(name, {})
        out[name] = {"before": row["before"], "after": row["after"], "improved": test.get("improved"),
                     "worsened": test.get("worsened"), "p_value": test.get("p_value")}
    loss = metrics.get("held-out loss")
    if loss:
        out["heldout_loss"] = {k: loss[k] for k in ("before", "before_ci", "after", "after_ci")}
    out["mcq"] = {name: {"n": s["n"], "parsed": s["n"] - s["unparseable"], "correct": round(s["accuracy"] * s["n"])}
                  for name, s in comparison["mcq"]["after"].items()}
    out["mcq_before"] = {name: {"n": s["n"], "parsed": s["n"] - s["unparseable"]} for name, s in comparison["mcq"]["before"].items()}
    rouge = tests.get("ROUGE-L")
    if rouge:
        out["rouge_l"] = {"mean_difference": rouge["mean_difference"], "ci": rouge["ci"], "n": rouge["n"]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clean-clone", action="store_true", help="clone HEAD and time `make setup` without caches first")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder of the results JSON")
    parser.add_argument("--benchmarks-md", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result: dict[str, Any] = {"date": dt.date.today().isoformat(), "machine": cpu_name(), "commit": commit}
    checkout = ROOT
    if args.clean_clone:
        if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip():
            print("note: the checkout has uncommitted changes; the clean clone measures HEAD without them")
        checkout = Path(tempfile.mkdtemp(prefix="medcot-demo-")) / "medcot"
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(checkout)], check=True)
        # A new user's machine: no pip or uv cache, and the embedded model not converted yet.
        env.update(PIP_NO_CACHE_DIR="1", UV_NO_CACHE="1", MEDCOT_CACHE=str(checkout.parent / "medcot-cache"))
        t0 = time.monotonic()
        subprocess.run(["make", "setup"], cwd=checkout, env=env, check=True)
        result["setup_s"] = round(time.monotonic() - t0, 1)
        print(f"  make setup       {result['setup_s']:7.1f} s", flush=True)
    python = checkout / ".venv" / "bin" / "python"
    probe = ("import torch; from medcot.modeling import cpu_has_native_bf16; "
             "print(torch.__version__, 'bf16' if cpu_has_native_bf16() else 'fp32')")
    result["torch"], dtype = subprocess.run([str(python), "-c", probe], cwd=checkout, env=env, capture_output=True,
                                            text=True, check=True).stdout.split()
    result["dtype"] = "bf16 weights and autocast (AMX or AVX-512 BF16)" if dtype == "bf16" else "fp32 (no bf16 instructions)"
    result.update(run_demo(checkout, env))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", result["machine"].lower()).strip("-")[:40]
    path = out / f"{result['date']}-cpu-demo-{slug}.json"
    path.write_text(json.dumps(result, indent=2))
    write_benchmarks_md(Path(args.benchmarks_md), load_parts(page_sources(path)))
    print(f"\nresults: {path}; {args.benchmarks_md} written\n\n{render_demo(result, load_parts([path])[0].name)}")
    return 0 if all(j["exit"] == 0 for j in result["jobs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
