"""What `import unsloth` costs a train job, and how much of it is Unsloth rewriting TRL's trainers (not a section).

    python3 bench/import_cost.py --runs 3 --out DIR      # on a GPU machine, in the lock environment

Each run is a new process, as a job is: `import torch` with CUDA initialised, then `import unsloth`. The runs
alternate between Unsloth as the train job imports it and `UNSLOTH_ALLOW_CPU=1`, with which Unsloth skips
rewriting TRL's trainers (its CPU-CI switch); the difference bounds what rewriting only the SFT trainer could save.
The last default run then rewrites each trainer once more, one at a time, and times each. Unsloth's generated
modules go to one folder shared by the runs, as the compile-cache volume holds them for every job.
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
import json, sys, time
t0 = time.monotonic()
import torch
torch.cuda.init()
t1 = time.monotonic()
import unsloth  # noqa: F401
t2 = time.monotonic()
out = {"torch_s": round(t1 - t0, 2), "unsloth_s": round(t2 - t1, 2)}
if sys.argv[1] == "per-trainer":
    import trl.trainer
    from unsloth.models import rl

    names = [x for x in dir(trl.trainer) if x.islower() and x.endswith("_trainer") and x != "base_trainer"]
    out["trainers"] = {}
    for name in names:
        t = time.monotonic()
        rl._patch_trl_rl_trainers(name)
        out["trainers"][name] = round(time.monotonic() - t, 3)
print("RESULT " + json.dumps(out))
"""


def run_child(mode: str, env: dict[str, str]) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"import_cost: the {mode} run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--out", help="folder for import-cost.json")
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="medcot-import-cost-")
    base = {**os.environ, "UNSLOTH_COMPILE_LOCATION": cache, "HF_HUB_OFFLINE": "1"}
    base.pop("UNSLOTH_ALLOW_CPU", None)
    runs: dict[str, list[dict]] = {"default": [], "UNSLOTH_ALLOW_CPU=1": []}
    run_child("default", base)  # fills the shared folder of generated modules, as an earlier job would
    for i in range(args.runs):
        last = i == args.runs - 1
        runs["default"].append(run_child("per-trainer" if last else "default", base))
        runs["UNSLOTH_ALLOW_CPU=1"].append(run_child("default", {**base, "UNSLOTH_ALLOW_CPU": "1"}))
        print(f"run {i + 1}: import unsloth {runs['default'][-1]['unsloth_s']} s as a job imports it, "
              f"{runs['UNSLOTH_ALLOW_CPU=1'][-1]['unsloth_s']} s without rewriting TRL's trainers", flush=True)
    summary = {kind: {"median_s": statistics.median(r["unsloth_s"] for r in rs), "min_s": min(r["unsloth_s"] for r in rs)}
               for kind, rs in runs.items()}
    trainers = runs["default"][-1].get("trainers", {})
    print(json.dumps(summary))
    print(f"rewriting each trainer once more: {sum(trainers.values()):.2f} s for {len(trainers)} trainers; "
          + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(trainers.items(), key=lambda kv: -kv[1])))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "import-cost.json").write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
