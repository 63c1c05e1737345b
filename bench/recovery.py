"""What a recovery costs, and what the reference chain costs on one H100 or H200: docs/cloud.md's numbers.

    python3 bench/recovery.py [--out bench/results/DATE-cpu-recovery.json]

Runs on a CPU machine with the project's venvs (`make test` builds both): no cloud, no GPU.

Measured here: the launch file run as SkyPilot runs it (tests/cloud_sim.py) on the tiny model, uninterrupted and then
with its VM killed (SIGKILL of every process) right after checkpoint-4 reached the bucket and replaced by a new VM: the
steps and seconds of training lost, the new VM's time to resume, the time it spent restoring from the bucket; and the
speed of a durable copy and restore of a checkpoint shaped like the reference recipe's, on this machine's disk.
Estimated from those and from earlier measurements (each named): what a new cloud VM pays before it resumes, and the
cost table. The cloud itself (provisioning, a bucket's speed, preemption notices) is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from cloud_sim import NodeScript, lay_vm, node_env, skypilot_task  # noqa: E402

from medcot.durable import Mirror  # noqa: E402

CHAIN = ROOT / "deploy" / "skypilot" / "chain.yaml"
RUN = "bench"
MAX_STEPS, SAVE_STEPS = 12, 4
SLOW_TRAIN_S = 0.5  # per step: the tiny model's steps take milliseconds; a real step on an H200 takes 0.59 s
SLOW_TRAIN = f"""
import os, sys, time
if sys.argv and sys.argv[0].endswith("jobs/train.py"):
    sys.path.insert(0, os.getcwd())
    import medcot.training as _t
    from transformers import TrainerCallback

    class _Slow(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            time.sleep({SLOW_TRAIN_S})

    _build = _t.build_trainer
    def _slow_build(*a, **kw):
        trainer = _build(*a, **kw)
        trainer.add_callback(_Slow())
        return trainer
    _t.build_trainer = _slow_build
"""

# The reference chain, measured: five jobs on an H200 with the image's pins, first start to last exit (2026-12-03,
# bench/results/2026-12-03-h200-s11-chain.json); 8B-shaped model with random weights, so no model download.
CHAIN_H200_S = 179.5
CHAIN_H200_EARLIER_S = (200.0, 226.1)
# A new VM's start-up, measured elsewhere: `make image` with no build cache on a 2-core VM (2026-12-02, README: Image);
# the image's size on disk.
IMAGE_BUILD_S = 267.0
IMAGE_GB = 6.76
# The reference recipe's downloads (make doctor's estimate: 0.75 GB a billion parameters for the 4-bit model, 2 for the
# 16-bit base the merge reads) and its checkpoint (41,943,040 LoRA parameters, bench/results/*h100*: fp32 adapter 4
# bytes each, 8-bit Adam's two states 1 byte each, trainer and RNG states).
DOWNLOAD_GB = 8.03 * 0.75 + 8.03 * 2.0
CHECKPOINT_FILES_MB = {"adapter_model.safetensors": 168, "optimizer.pt": 85, "scheduler.pt": 1, "rng_state.pth": 1}
# What the first jobs of a new VM pay for an empty compile cache (BENCHMARKS.md, H200): the train job's first step
# 10-15 s instead of 2-3 s, evaluate's decode compile 7-13 s instead of 2.0-2.7 s.
COMPILE_CACHE_S = (8 + 5, 12 + 10)
# Assumed, not measured: the throughput of a cloud VM's network to a registry, the Hub and a bucket in its region, and
# the minutes a cloud takes to hand over a GPU VM with SkyPilot's runtime set up.
ASSUMED_MB_S = (100, 500)
ASSUMED_PROVISION_S = (120, 300)
# Prices per GPU-hour, as read (third-party summaries of the providers' pages; the dates are those the pages give).
PRICES = [
    {"gpu": "H100", "offer": "AWS P5, per GPU", "on_demand": 3.90, "spot": 2.25,
     "source": "costnimbus.com/article/gpu-cost-management-ml-teams (March 2026: on-demand ~$3.90, spot ~$2.00-2.50)"},
    {"gpu": "H100", "offer": "GCP A3-High, per GPU", "on_demand": 3.00, "spot": 2.25,
     "source": "costnimbus.com/article/gpu-cost-management-ml-teams (March 2026)"},
    {"gpu": "H100", "offer": "Lambda, 1x H100 SXM", "on_demand": 3.78, "spot": None,
     "source": "techbytes.app serverless GPU pricing matrix (verified against Lambda's page 2026-05-07); no spot"},
    {"gpu": "H200", "offer": "RunPod, H200", "on_demand": 3.59, "spot": 1.65,
     "source": "deploybase.ai/articles/spot-gpu-pricing (March 2026)"},
    {"gpu": "H200", "offer": "AWS P5e Capacity Blocks, per GPU", "on_demand": 5.408, "spot": None,
     "source": "aws.amazon.com/ec2/capacityblocks/pricing (rates until 2025-01-01; a reservation, shown for scale)"},
]


class Vm:
    def __init__(self, home: Path, bucket: Path, base: dict, tiny: Path, data: Path):
        home.mkdir(parents=True)
        self.home, self.workdir, self.base = home, lay_vm(home), base
        args = " ".join([
            f"model.name={tiny}", "model.max_seq_length=256", "model.load_in_4bit=false", f"data.path={data}",
            "data.train_rows=16", "data.heldout_rows=4", "lora.use_gradient_checkpointing=false",
            "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2",
            f"training.max_steps={MAX_STEPS}", "training.warmup_steps=1", "training.logging_steps=1",
            f"training.save_steps={SAVE_STEPS}", "training.optim=adamw_torch", "tracking.report_to=none",
            "eval.max_new_tokens=8", "eval.batch_size=4", "eval.heldout_limit=4", "eval.showcase_questions=[]",
            "eval.mcq=[]", "merge.dtype=float16"])
        env = {"CONFIG": "configs/demo.yaml", "RUN_NAME": RUN, "ARGS": args, "MEDCOT_BUCKET": "s3://bench/runs",
               "MEDCOT_DURABLE_DIR": str(bucket), "MEDCOT_RUNNER": "venv", "MEDCOT_VENV": str(ROOT / ".venv")}
        self.task = skypilot_task(CHAIN, env=env, secrets={"HF_TOKEN": "hf_benchunused0000"})
        setup = NodeScript(self.task["setup"], home, base, "setup")
        assert setup.finish() == 0, setup.output[-3000:]

    def start(self) -> NodeScript:
        return NodeScript(self.task["run"], self.home, self.base, "run")


def simulate(tmp: Path) -> dict:
    from reliability import short_rows, write_jsonl

    from conftest import build_tiny_llama

    tiny = build_tiny_llama(tmp / "tiny")
    data = write_jsonl(tmp / "data.jsonl", short_rows(40))
    hooks = tmp / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_TRAIN)
    base = node_env(tmp, PYTHONPATH=str(hooks))

    t0 = time.monotonic()
    ref = Vm(tmp / "ref", tmp / "ref-bucket", base, tiny, data).start()
    assert ref.finish() == 0, ref.output[-3000:]
    uninterrupted_s = time.monotonic() - t0

    vm1 = Vm(tmp / "vm1", tmp / "bucket", base, tiny, data)
    t_start1 = time.monotonic()
    run1 = vm1.start()
    run1.wait_for(rf"durable: checkpoints/checkpoint-{SAVE_STEPS} committed")
    t_committed = time.monotonic()
    time.sleep(SAVE_STEPS * SLOW_TRAIN_S * 0.75)  # the VM goes most of a save interval after that checkpoint
    t_kill = run1.kill_vm()
    run1.finish()
    steps_seen = max(int(s) for s in re.findall(rf"step (\d+)/{MAX_STEPS} ", run1.output))

    vm2 = Vm(tmp / "vm2", tmp / "bucket", base, tiny, data)
    t_start2 = time.monotonic()
    run2 = vm2.start()
    run2.wait_for(rf"resuming from \S*checkpoint-{SAVE_STEPS}")
    t_resumed = time.monotonic()
    assert run2.finish() == 0, run2.output[-3000:]
    t_done2 = time.monotonic()
    restores = {m.group(1): float(m.group(2)) for m in
                re.finditer(r"durable: restored (\S+) from .* in ([\d.]+) s", run2.output)}
    copies = [float(s) for s in re.findall(r"durable: \S+ committed to .* in ([\d.]+) s", ref.output)]
    summary = json.loads((vm2.workdir / "outputs" / RUN / "train" / "summary.json").read_text())
    return {
        "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "seconds_per_step": SLOW_TRAIN_S,
        "uninterrupted_chain_s": round(uninterrupted_s, 1),
        "vm1_s_until_kill": round(t_kill - t_start1, 1),
        "steps_done_before_kill": steps_seen, "resumed_from": summary["resumed_from"],
        "steps_redone": steps_seen - SAVE_STEPS,
        "training_s_lost": round(t_kill - t_committed, 2),
        "vm2_s_to_resume": round(t_resumed - t_start2, 1),
        "vm2_chain_s": round(t_done2 - t_start2, 1),
        "vm2_restore_s": restores,
        "durable_copy_s_per_commit": copies,
        "train_durable_copy_s": summary["durable_copy_s"],
    }


def copy_rate(tmp: Path) -> dict:
    """A durable copy and a verified restore of a recipe-sized checkpoint, local disk to local disk."""
    folder = tmp / "checkpoint-20"
    folder.mkdir()
    for name, mb in CHECKPOINT_FILES_MB.items():
        with (folder / name).open("wb") as f:
            for _ in range(mb):
                f.write(os.urandom(1 << 20))
    mirror = Mirror(tmp / "bucket" / "run")
    t0 = time.monotonic()
    mirror.commit("checkpoints/checkpoint-20", folder)
    commit_s = time.monotonic() - t0
    t0 = time.monotonic()
    assert mirror.restore("checkpoints/checkpoint-20", tmp / "restored") is not None
    restore_s = time.monotonic() - t0
    mb = sum(CHECKPOINT_FILES_MB.values())
    return {"checkpoint_mb": mb, "commit_s": round(commit_s, 2), "restore_s": round(restore_s, 2),
            "commit_mb_s": round(mb / commit_s, 1), "restore_mb_s": round(mb / restore_s, 1)}


def estimates() -> dict:
    """A new cloud VM before it resumes, from measured parts and the assumptions above (low, high)."""
    mb_s = ASSUMED_MB_S
    pull = tuple(round(IMAGE_GB * 1000 / r) for r in reversed(mb_s))
    download = tuple(round(DOWNLOAD_GB * 1000 / r) for r in reversed(mb_s))
    checkpoint = tuple(round(sum(CHECKPOINT_FILES_MB.values()) / r, 1) for r in reversed(mb_s))
    return {
        "provision_s_assumed": ASSUMED_PROVISION_S,
        "image_build_s_measured": IMAGE_BUILD_S,
        "image_pull_s_estimated": pull,
        "model_download_gb": round(DOWNLOAD_GB, 1), "model_download_s_estimated": download,
        "compile_cache_s_measured": COMPILE_CACHE_S,
        "checkpoint_copy_s_estimated": checkpoint,
    }


def costs(est: dict) -> list[dict]:
    """Dollars for one chain on one GPU: the measured chain, plus the start-up a VM pays (image build or pull, the
    model download, provisioning), at each price read."""
    rows = []
    for setup, image_s in (("build", (IMAGE_BUILD_S, IMAGE_BUILD_S)), ("pull", est["image_pull_s_estimated"])):
        low = ASSUMED_PROVISION_S[0] + image_s[0] + est["model_download_s_estimated"][0] + CHAIN_H200_S
        high = ASSUMED_PROVISION_S[1] + image_s[1] + est["model_download_s_estimated"][1] + max(CHAIN_H200_EARLIER_S)
        for price in PRICES:
            row = {"gpu": price["gpu"], "offer": price["offer"], "image": setup, "hours": (round(low / 3600, 3),
                                                                                          round(high / 3600, 3))}
            for kind in ("on_demand", "spot"):
                rate = price[kind]
                row[kind] = None if rate is None else (round(rate * low / 3600, 2), round(rate * high / 3600, 2))
            row["chain_only_on_demand"] = round(price["on_demand"] * CHAIN_H200_S / 3600, 3)
            row["source"] = price["source"]
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"{date.today()}-cpu-recovery.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "sim").mkdir()
        (tmp / "copy").mkdir()
        measured = simulate(tmp / "sim")
        rate = copy_rate(tmp / "copy")
    est = estimates()
    result = {"environment": {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
                       "cores": os.cpu_count(), "python": platform.python_version(),
                       "note": "shared 2-core CPU VM; times vary with the other work on it"},
              "simulated_recovery": measured, "durable_copy_local_disk": rate, "new_vm_estimates": est,
              "costs": costs(est)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
