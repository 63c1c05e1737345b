"""The launch files as SkyPilot runs them, on CPU: a managed job whose VM is reclaimed mid-training and recovered on a
new one, and the train job across two nodes. Every run executes the launch file's own `setup` and `run` as SkyPilot's
runtime wraps them (tests/cloud_sim.py) with MEDCOT_RUNNER=venv, on the tiny model; the bucket is a local folder at
the mount point, which is what a SkyPilot MOUNT gives the jobs.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time
from pathlib import Path

import pytest
import torch
from cloud_sim import CLOUD_PYTHON, ROOT, NodeScript, free_port, lay_vm, node_env, skypilot_task
from reliability import adapter_tensors, assert_same_tensors, run, short_rows, write_jsonl
from safetensors.torch import load_file

from medcot.durable import Commit

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CLOUD_PYTHON.exists() and not os.environ.get("CI"),
                       reason="SkyPilot's venv is missing: make .venv-cloud/.installed (make test builds it)"),
]

CHAIN = ROOT / "deploy" / "skypilot" / "chain.yaml"
MULTINODE = ROOT / "deploy" / "skypilot" / "chain-multinode.yaml"
MAX_STEPS, SAVE_STEPS = 8, 2
RUN = "cloud"
# Every optimizer step of the train job takes at least 0.25 s (the tiny model's take milliseconds), so that the VM
# can be killed between two given steps. Loaded into the VM's Python processes as sitecustomize.
SLOW_TRAIN = """
import os, sys, time
if sys.argv and sys.argv[0].endswith("jobs/train.py"):
    sys.path.insert(0, os.getcwd())
    import medcot.training as _t
    from transformers import TrainerCallback

    class _Slow(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            time.sleep(0.25)

    _build = _t.build_trainer
    def _slow_build(*a, **kw):
        trainer = _build(*a, **kw)
        trainer.add_callback(_Slow())
        return trainer
    _t.build_trainer = _slow_build
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "short.jsonl", short_rows(40))


def chain_args(tiny_model: Path, data: Path, *extra: str) -> str:
    """The demo config shrunk to the tiny model: ARGS as a user passes them (--env ARGS="...")."""
    return " ".join([
        f"model.name={tiny_model}", "model.max_seq_length=256", "model.load_in_4bit=false", f"data.path={data}",
        "data.train_rows=16", "data.heldout_rows=4", "lora.use_gradient_checkpointing=false", "lora.lora_dropout=0.1",
        "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2",
        f"training.max_steps={MAX_STEPS}", "training.warmup_steps=1", "training.logging_steps=1",
        f"training.save_steps={SAVE_STEPS}", "training.optim=adamw_torch", "training.learning_rate=1e-3",
        "tracking.report_to=none", "eval.max_new_tokens=8", "eval.batch_size=4", "eval.heldout_limit=4",
        "eval.showcase_questions=[]", "eval.mcq=[]", "merge.dtype=float16", *extra,
    ])


class Vm:
    """A fresh VM running one node of a launch file: setup, then run."""

    def __init__(self, home: Path, launch_file: Path, env: dict[str, str], secrets_: dict[str, str], base_env: dict,
                 rank: int = 0, ips: list[str] | None = None):
        home.mkdir(parents=True)
        self.home, self.workdir = home, lay_vm(home)
        self.task = skypilot_task(launch_file, env=env, secrets=secrets_, rank=rank, ips=ips)
        self.base_env = base_env

    def setup(self) -> None:
        done = NodeScript(self.task["setup"], self.home, self.base_env, "setup")
        assert done.finish() == 0, done.output[-4000:]

    def start(self) -> NodeScript:
        return NodeScript(self.task["run"], self.home, self.base_env, "run")


def launch_env(tiny_model, data, bucket: Path, *extra: str) -> dict[str, str]:
    """--env values of `sky jobs launch`: the demo config, a run name, ARGS, the bucket, and the venv runner; the
    mount point is the local folder that stands for the bucket."""
    return {"CONFIG": "configs/demo.yaml", "RUN_NAME": RUN, "ARGS": chain_args(tiny_model, data, *extra),
            "MEDCOT_BUCKET": "s3://medcot-test-bucket/runs", "MEDCOT_DURABLE_DIR": str(bucket),
            "MEDCOT_RUNNER": "venv", "MEDCOT_VENV": str(Path(os.sys.executable).parents[1])}


def run_losses(summary_path: Path) -> list[tuple[int, float]]:
    return [(h["step"], h["loss"]) for h in json.loads(summary_path.read_text())["losses"]]


def train_alone(tiny_model, data, tmp_path: Path, *extra: str) -> Path:
    """The train job of the same launch, in one process and never interrupted: what the cloud runs must equal."""
    out = tmp_path / "alone"
    done = run("train", ["--config", str(ROOT / "configs" / "demo.yaml"), "--run-name", RUN,
                         *chain_args(tiny_model, data, *extra).split(), f"output_dir={out}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    return out / RUN


def test_a_vm_killed_mid_training_is_replaced_and_the_chain_finishes_from_the_bucket_as_if_never_killed(
        tiny_model, data, tmp_path, record_property):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_TRAIN)
    base = node_env(tmp_path, PYTHONPATH=str(hooks))
    token = "hf_cloudcanary" + secrets.token_hex(8)
    secret = {"HF_TOKEN": token}

    reference = train_alone(tiny_model, data, tmp_path)

    bucket = tmp_path / "bucket"
    vm1 = Vm(tmp_path / "vm1", CHAIN, launch_env(tiny_model, data, bucket), secret, base)
    vm1.setup()
    run1 = vm1.start()
    run1.wait_for(r"durable: checkpoints/checkpoint-4 committed")
    killed_at = run1.kill_vm()
    assert run1.finish() != 0
    steps_seen = [int(s) for s in re.findall(rf"step (\d+)/{MAX_STEPS} ", run1.output)]
    run_bucket = bucket / RUN
    assert not (run_bucket / "train.commit.json").exists()
    assert {p.name for p in (run_bucket / "checkpoints").glob("*.commit.json")} == {
        "checkpoint-2.commit.json", "checkpoint-4.commit.json"}
    before_commit = (run_bucket / "eval-before.commit.json").read_text()

    vm2 = Vm(tmp_path / "vm2", CHAIN, launch_env(tiny_model, data, bucket), secret, base)
    vm2.setup()
    run2 = vm2.start()
    run2.wait_for(r"resuming from \S*checkpoint-4")
    resumed_at = time.monotonic()
    assert run2.finish() == 0, run2.output[-6000:]
    out = run2.output

    # Finished stages are not redone: evaluate-before's copy comes back verified and the job has nothing to do.
    assert "durable: restored eval-before" in out
    assert re.search(r"eval-before: already finished .*; nothing to do", out)
    assert (run_bucket / "eval-before.commit.json").read_text() == before_commit
    # Training resumes from the last complete checkpoint: at most one save interval is lost.
    assert "durable: restored checkpoints/checkpoint-4" in out
    assert max(steps_seen) - 4 <= SAVE_STEPS
    local = vm2.workdir / "outputs" / RUN
    summary = json.loads((local / "train" / "summary.json").read_text())
    assert summary["resumed_from"] == "checkpoint-4"
    # ... and ends exactly where the uninterrupted run ends.
    ref_local = reference
    ours, theirs = run_losses(local / "train" / "summary.json"), run_losses(ref_local / "train" / "summary.json")
    assert [s for s, _ in ours] == [s for s, _ in theirs] == list(range(1, MAX_STEPS + 1))
    assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], abs=1e-6)
    assert_same_tensors(adapter_tensors(local / "train" / "adapter"), adapter_tensors(ref_local / "train" / "adapter"))

    # The bucket holds every stage, each verifiable from its record, the adapter equal to the reference's.
    for stage in ("eval-before", "train", "merge", "eval-after", "push-dry-run", "report"):
        commit = Commit.parse((run_bucket / f"{stage}.commit.json").read_text())
        assert all((run_bucket / stage / f.path).stat().st_size == f.size for f in commit.files), stage
    assert_same_tensors(load_file(run_bucket / "train" / "adapter" / "adapter_model.safetensors"),
                        adapter_tensors(ref_local / "train" / "adapter"))
    # The token went in as a SkyPilot secret: it is in no log and no file of the bucket or the VMs' run directories.
    assert token not in run1.output + out
    for folder in (bucket, vm1.workdir / "outputs", vm2.workdir / "outputs"):
        for f in folder.rglob("*"):
            assert not f.is_file() or token.encode() not in f.read_bytes(), f

    lost_steps = max(steps_seen) - 4
    record_property("steps_redone", lost_steps)
    record_property("seconds_from_kill_to_resume_on_new_vm", round(resumed_at - killed_at, 1))


def test_a_preemption_notice_commits_a_checkpoint_and_the_job_exits_143_for_skypilot_to_recover(
        tiny_model, data, tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_TRAIN)
    bucket = tmp_path / "bucket"
    vm = Vm(tmp_path / "vm", CHAIN, launch_env(tiny_model, data, bucket), {"HF_TOKEN": "hf_unused_here"},
            node_env(tmp_path, PYTHONPATH=str(hooks)))
    vm.setup()
    chain = vm.start()
    chain.wait_for(rf"step 3/{MAX_STEPS} ")

    chain.kill_vm(signal.SIGTERM)  # a VM's shutdown signals every process

    # 143 is what the launch files' job_recovery.recover_on_exit_codes turns into a recovery on a new VM.
    assert chain.finish(timeout=120) == 143, chain.output[-4000:]
    stopped = int(re.search(rf"stopped by SIGTERM at step (\d+)/{MAX_STEPS}", chain.output).group(1))
    commit = Commit.parse((bucket / RUN / "checkpoints" / f"checkpoint-{stopped}.commit.json").read_text())
    assert {f.path for f in commit.files} >= {"adapter_model.safetensors", "optimizer.pt", "trainer_state.json"}
    assert "medcot chain: stopped by a signal; the same launch resumes from the bucket" in chain.output


def test_two_nodes_train_as_one_process_with_the_same_global_batch(tiny_model, data, tmp_path):
    bucket = tmp_path / "bucket"
    base = node_env(tmp_path, MASTER_PORT=str(free_port()))
    # fp32 and no dropout, as tests/test_distributed.py: the check is of the data-parallel arithmetic.
    common = ("model.dtype=float32", "lora.lora_dropout=0.0", "training.save_steps=10")
    env = launch_env(tiny_model, data, bucket, *common, "training.per_device_train_batch_size=2",
                     "training.gradient_accumulation_steps=1")
    nodes = [Vm(tmp_path / f"node{rank}", MULTINODE, env, {"HF_TOKEN": "hf_unused_here"}, base, rank=rank,
                ips=["127.0.0.1", "127.0.0.1"]) for rank in (0, 1)]
    assert nodes[0].task["num_nodes"] == 2
    for node in nodes:
        node.setup()
    runs = [node.start() for node in nodes]
    codes = [run.finish() for run in runs]
    assert codes == [0, 0], "\n\n".join(run.output[-5000:] for run in runs)

    # One process, the same global batch of 4 rows a step.
    one = train_alone(tiny_model, data, tmp_path, *common, "training.per_device_train_batch_size=4",
                      "training.gradient_accumulation_steps=1")

    head = nodes[0].workdir / "outputs" / RUN
    s2 = json.loads((head / "train" / "summary.json").read_text())
    s1 = json.loads((one / "train" / "summary.json").read_text())
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s1["global_batch_size"] == s2["global_batch_size"] == 4
    for a, b in zip(s1["losses"], s2["losses"], strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    w1 = adapter_tensors(one / "train" / "adapter")
    w2 = adapter_tensors(head / "train" / "adapter")
    for name in w1:
        torch.testing.assert_close(w1[name], w2[name], atol=1e-6, rtol=1e-4)
    # Only the head writes: the other node published no stage and ran no other job; the bucket has one of each.
    worker = nodes[1].workdir / "outputs" / RUN
    assert not any((worker / stage).exists() for stage in ("eval-before", "train", "merge", "eval-after"))
    assert (bucket / RUN / "train.commit.json").is_file() and (bucket / RUN / "eval-after.commit.json").is_file()
