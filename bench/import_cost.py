"""What importing Unsloth costs a train job, with medcot's SFT-only trainer rewrite and without it (not a section).

    python3 bench/import_cost.py --runs 3 --out DIR      # on a GPU machine, in the lock environment

Each run is a new process, as a job is: `import torch` with CUDA initialised, then medcot's `select_backend` for the
unsloth backend, which imports Unsloth (medcot.unsloth_trainers). The runs alternate between the default (Unsloth
rewrites TRL's SFT trainer only) and MEDCOT_UNSLOTH_SFT_ONLY=0 (it rewrites every trainer TRL ships). Unsloth's
generated modules go to one folder per kind, shared by its runs and filled by one run first, as the compile-cache
volume holds them for every job after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, time
t0 = time.monotonic()
import torch
torch.cuda.init()
t1 = time.monotonic()
from medcot.config import ModelConfig
from medcot.modeling import select_backend

select_backend(ModelConfig(backend="unsloth"))
t2 = time.monotonic()
import trl

out = {"torch_s": round(t1 - t0, 2), "unsloth_s": round(t2 - t1, 2), "dpo_trainer": trl.DPOTrainer.__name__}
print("RESULT " + json.dumps(out))
"""

KINDS = {"SFT trainer only (default)": {}, "every trainer (MEDCOT_UNSLOTH_SFT_ONLY=0)": {"MEDCOT_UNSLOTH_SFT_ONLY": "0"}}


def run_child(env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"import_cost: a run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--out", help="folder for import-cost.json")
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    base.pop("MEDCOT_UNSLOTH_SFT_ONLY", None)
    envs = {kind: {**base, **extra, "MEDCOT_COMPILE_CACHE": tempfile.mkdtemp(prefix="medcot-import-cost-")}
            for kind, extra in KINDS.items()}
    for env in envs.values():
        run_child(env)  # fills the kind's folder of generated modules, as an earlier job would
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for i in range(args.runs):
        for kind, env in envs.items():
            runs[kind].append(run_child(env))
        print(f"run {i + 1}: " + ", ".join(f"{kind}: {rs[-1]['unsloth_s']} s (DPOTrainer is {rs[-1]['dpo_trainer']})"
                                          for kind, rs in runs.items()), flush=True)
    summary = {kind: {"median_s": statistics.median(r["unsloth_s"] for r in rs), "min_s": min(r["unsloth_s"] for r in rs),
                      "max_s": max(r["unsloth_s"] for r in rs)} for kind, rs in runs.items()}
    print(json.dumps(summary))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "import-cost.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
