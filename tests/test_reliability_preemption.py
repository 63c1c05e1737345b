"""Preemption: a train job stopped by SIGTERM, SIGINT or SIGKILL and run again ends exactly where an
uninterrupted run with the same seed ends: the same loss at every step and the same adapter weights.

Every test runs `jobs/train.py` as a subprocess on the tiny model (about 10 s each on two cores, mostly
imports), so the module is marked slow. The step or moment of each interruption comes from FAULT_SEED.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time

import pytest
from reliability import (
    FAULT_SEED,
    SLOW_STEPS,
    LiveJob,
    adapter_tensors,
    assert_same_tensors,
    losses,
    overrides,
    run,
    short_rows,
    write_jsonl,
)

from medcot.training import COMPLETE_MARK, complete_checkpoints

pytestmark = pytest.mark.slow

MAX_STEPS = 8
# Spot VMs give 30 s (GCP) to 2 min (AWS) of notice; the tiny model stops in about a second.
STOP_WITHIN_S = 30


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "short.jsonl", short_rows(40))


@pytest.fixture(scope="module")
def reference(tiny_model, data, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    work = tmp_path_factory.mktemp("reference")
    done = run("train", overrides(tiny_model, data, work / "out", "run_name=reference"), work)
    assert done.returncode == 0, done.stderr
    return work / "out" / "reference"


@pytest.fixture
def args(tiny_model, data, tmp_path):
    def make(*extra: str) -> list[str]:
        return overrides(tiny_model, data, tmp_path / "out", "run_name=interrupted", *extra)
    return make


def assert_matches_reference(run_dir, reference) -> None:
    ours, theirs = losses(run_dir), losses(reference)
    assert [s for s, _ in ours] == [s for s, _ in theirs] == list(range(1, MAX_STEPS + 1))
    assert [v for _, v in ours] == pytest.approx([v for _, v in theirs], abs=1e-6)
    assert_same_tensors(adapter_tensors(run_dir / "train" / "adapter"), adapter_tensors(reference / "train" / "adapter"))


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_at_a_random_step_saves_exits_nonzero_and_the_rerun_matches_an_uninterrupted_run(
        sig, code, args, reference, tmp_path, record_property):
    k = random.Random(f"{FAULT_SEED}-{sig.name}").randint(1, 5)
    job = LiveJob("train", args(), tmp_path, fault=SLOW_STEPS)
    job.wait_for(rf"step {k}/{MAX_STEPS} ")
    sent = job.send(sig)
    rc = job.finish()
    stop_s = time.monotonic() - sent
    record_property("seconds_from_signal_to_exit", round(stop_s, 2))

    assert rc == code, job.stderr
    assert stop_s < STOP_WITHIN_S
    assert "Traceback" not in job.stderr
    stopped = job.wait_for(rf"stopped by {sig.name} at step (\d+)/{MAX_STEPS}; checkpoint (checkpoint-\d+) saved\. "
                           r"Rerun the same command to resume from it\.")
    step = int(stopped.group(1))
    assert k < step <= MAX_STEPS  # it finished the step under way, not one more
    run_dir = tmp_path / "out" / "interrupted"
    assert stopped.group(2) == f"checkpoint-{step}" == complete_checkpoints(run_dir / "checkpoints")[-1].name
    assert not (run_dir / "train").exists()  # an interrupted run publishes nothing

    resumed = run("train", args(), tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {run_dir / 'checkpoints' / f'checkpoint-{step}'}" in resumed.stderr
    assert json.loads((run_dir / "train" / "summary.json").read_text())["resumed_from"] == f"checkpoint-{step}"
    assert_matches_reference(run_dir, reference)


def test_sigkill_at_a_random_moment_resumes_from_the_last_complete_checkpoint(args, reference, tmp_path):
    # save_steps=1: a checkpoint is being written most of the time, so the kill often lands inside one.
    # Saving more often changes nothing else: the result must still be the reference's.
    delay = random.Random(f"{FAULT_SEED}-SIGKILL").uniform(0.0, 1.5)
    job = LiveJob("train", args("training.save_steps=1"), tmp_path, fault=SLOW_STEPS)
    job.wait_for(rf"step 1/{MAX_STEPS} ")
    time.sleep(delay)
    job.send(signal.SIGKILL)
    assert job.finish() == -signal.SIGKILL
    checkpoints = tmp_path / "out" / "interrupted" / "checkpoints"
    last = complete_checkpoints(checkpoints)[-1].name if complete_checkpoints(checkpoints) else None

    resumed = run("train", args("training.save_steps=1"), tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    if last:
        assert f"resuming from {checkpoints / last}" in resumed.stderr
    assert_matches_reference(tmp_path / "out" / "interrupted", reference)


KILL_WHILE_SAVING_OPTIMIZER = """
    # Write half of checkpoint-4's optimizer.pt, then SIGKILL: the adapter is already in the folder, the
    # optimizer half there, the scheduler, RNG and trainer state missing, and no completion mark.
    import io, os, signal
    import torch
    _save = torch.save
    def _save_then_die(obj, f, *a, **kw):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            buffer = io.BytesIO()
            _save(obj, buffer, *a, **kw)
            data = buffer.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(obj, f, *a, **kw)
    torch.save = _save_then_die
"""


def test_sigkill_in_the_middle_of_a_checkpoint_save_never_resumes_from_the_partial_checkpoint(args, reference, tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    done = run("train", args(), tmp_path, fault=KILL_WHILE_SAVING_OPTIMIZER)
    assert done.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "out" / "interrupted" / "checkpoints"
    partial = checkpoints / "checkpoint-4"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / COMPLETE_MARK).exists()
    # The trap this guards against: transformers' own rule would resume from the half-written folder.
    assert get_last_checkpoint(str(checkpoints)) == str(partial)

    resumed = run("train", args(), tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint checkpoint-4 was never completed (save cut off); removed" in resumed.stderr
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in resumed.stderr
    assert_matches_reference(tmp_path / "out" / "interrupted", reference)


def test_unmarked_checkpoint_folders_are_discarded_and_the_last_marked_one_is_resumed(args, reference, tmp_path):
    checkpoints = tmp_path / "out" / "interrupted" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copy(reference / "checkpoints" / "config_hash", checkpoints)
    shutil.copytree(reference / "checkpoints" / "checkpoint-6", checkpoints / "checkpoint-6")
    fake = checkpoints / "checkpoint-999"  # a higher number than any real one, as a cut-off save leaves it
    fake.mkdir()
    (fake / "trainer_state.json").write_text('{"global_step": 999, "log_hist')
    (fake / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    half = checkpoints / "checkpoint-7"  # checkpoint-6's files, one cut short, no mark
    shutil.copytree(checkpoints / "checkpoint-6", half)
    (half / COMPLETE_MARK).unlink()
    optimizer = (half / "optimizer.pt").read_bytes()
    (half / "optimizer.pt").write_bytes(optimizer[: len(optimizer) // 3])

    resumed = run("train", args(), tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    for name in ("checkpoint-999", "checkpoint-7"):
        assert f"checkpoint {name} was never completed (save cut off); removed" in resumed.stderr
    assert f"resuming from {checkpoints / 'checkpoint-6'}" in resumed.stderr
    assert not fake.exists()
    assert_matches_reference(tmp_path / "out" / "interrupted", reference)
