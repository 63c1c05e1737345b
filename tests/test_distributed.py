"""Data-parallel training: two processes (torchrun, gloo on CPU) equal one process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from medcot.cli import data_parallel_argv
from medcot.config import ConfigError

from conftest import ROOT

TORCHRUN = Path(sys.executable).with_name("torchrun")


def run_train(launcher: list[str], overrides: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(ROOT / "jobs" / "train.py"), *overrides], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside this Python")
def test_two_processes_match_one_with_the_same_global_batch(tiny_config, tmp_path):
    # fp32: the check is of the data-parallel arithmetic, and bf16's rounding depends on the micro-batch's shape.
    common = tiny_config("data.heldout_rows=0", "training.gradient_accumulation_steps=1", "training.max_steps=4",
                         "training.save_steps=10", "model.dtype=float32")
    one = run_train([sys.executable], [*common, "run_name=one", "training.per_device_train_batch_size=4"])
    # GPUS=2, as compose passes it: the job restarts itself under torchrun with two workers.
    two = run_train([sys.executable], [*common, "run_name=two", "training.per_device_train_batch_size=2"],
                    env={"GPUS": "2"})
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]

    out = tmp_path / "outputs"
    s1, s2 = (json.loads((out / r / "train" / "summary.json").read_text()) for r in ("one", "two"))
    assert (s1["world_size"], s2["world_size"]) == (1, 2)
    assert s1["global_batch_size"] == s2["global_batch_size"] == 4
    assert [h["step"] for h in s2["losses"]] == [1, 2, 3, 4]
    for a, b in zip(s1["losses"], s2["losses"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    w1, w2 = (load_file(out / r / "train" / "adapter" / "adapter_model.safetensors") for r in ("one", "two"))
    assert w1.keys() == w2.keys()
    # Per tensor, not per weight: Adam's step is about the learning rate whatever the gradient's size, so a weight whose
    # gradient is near zero moves by another amount when the processes sum it in another order. Measured: at most
    # 3.6e-7 of a tensor's norm on a 2-core AMD EPYC; on a 16-core Xeon one weight of 512 was off by 2.0e-6 (3.7e-3 of
    # itself), about 6e-5 of its tensor's norm (0.035 here).
    for name in w1:
        assert (w1[name] - w2[name]).norm() <= 1e-3 * w1[name].norm(), name
    # Rank 0 alone logs: each step's line appears once.
    assert two.stderr.count("step 4/4") == 1


def test_gpus_above_one_restarts_the_job_under_torchrun_once():
    argv = data_parallel_argv("jobs/train.py", ["--config", "c.yaml"], {"GPUS": "4"})
    assert argv[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "jobs/train.py",
                        "--config", "c.yaml"]
    assert data_parallel_argv("jobs/train.py", [], {"NPROC": "2"})[4] == "--nproc_per_node=2"
    assert data_parallel_argv("jobs/train.py", [], {"GPUS": "2", "LOCAL_RANK": "0"}) is None  # already a worker
    assert data_parallel_argv("jobs/train.py", [], {"GPUS": "1"}) is None
    assert data_parallel_argv("jobs/train.py", [], {}) is None


@pytest.mark.parametrize("value", ["two", "0"])
def test_a_bad_gpus_value_is_refused_with_what_to_set(value):
    with pytest.raises(ConfigError, match="GPUS"):
        data_parallel_argv("jobs/train.py", [], {"GPUS": value})
