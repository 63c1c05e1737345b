"""Helpers for the reliability tests: run a real job as a subprocess, watch its log, inject a fault into it.

A fault is Python run in the job's process before the job's own `__main__` (through runpy), so the job is
exactly `jobs/<name>.py` with one function wrapped: a SIGKILL in the middle of a save, an out-of-memory
error from a forward hook, a disk that fills up. `FAULT_SEED` (env MEDCOT_FAULT_SEED) picks the random
steps and delays; the default keeps CI deterministic, another value explores other moments.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAULT_SEED = int(os.environ.get("MEDCOT_FAULT_SEED", "20261125"))

WORDS = ["patient", "fever", "cough", "chest", "pain", "renal", "acute", "chronic", "dose", "infection", "sepsis",
         "lesion", "nerve", "artery", "murmur", "rash", "edema", "anemia", "biopsy", "culture"]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """torch on one thread: on a shared two-core box, two threads made a tiny model's step 30x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def short_rows(n: int, seed: int = 0) -> list[dict]:
    """Clinical-looking rows of ~60 tokens each: training steps on the tiny model take milliseconds."""
    import random

    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [{"Question": f"Case {i}: a patient with {words(8)}?", "Complex_CoT": f"Reasoning: {words(20)}.",
             "Response": f"Answer: {words(6)}."} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def overrides(tiny_model: Path, data: Path, output_dir: Path, *extra: str) -> list[str]:
    """A train/evaluate/merge run on the tiny model that finishes in about a second of compute.

    16 training rows in steps of 4 make an epoch of 4 steps, so 8 steps cross an epoch boundary; LoRA
    dropout is on, so a resume must restore the RNG as well as the data position to match exactly."""
    return [
        f"model.name={tiny_model}", "model.max_seq_length=256", "model.load_in_4bit=false",
        f"data.path={data}", "data.train_rows=16", "data.heldout_rows=4", f"output_dir={output_dir}",
        "lora.use_gradient_checkpointing=false", "lora.lora_dropout=0.1",
        "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2",
        "training.max_steps=8", "training.warmup_steps=1", "training.logging_steps=1", "training.save_steps=2",
        "training.optim=adamw_torch", "training.learning_rate=1e-3", "tracking.report_to=none",
        "eval.max_new_tokens=8", "eval.batch_size=4", "eval.heldout_limit=4", "eval.showcase_questions=[]",
        "merge.dtype=float16", *extra,
    ]


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a job under test: offline, one thread (the CI box has two cores), no secrets."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_TOKEN", "HF_TOKEN_PATH", "WANDB_API_KEY", "HF_ENDPOINT", "RANK", "WORLD_SIZE")}
    secrets = tmp_path / "no-secrets"
    secrets.mkdir(exist_ok=True)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               MEDCOT_SECRETS_DIR=str(secrets), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def command(job: str, args: list[str], fault: str | None = None) -> list[str]:
    """argv that runs jobs/<job>.py, with `fault` (Python source) executed first in the same process."""
    path = ROOT / "jobs" / f"{job}.py"
    if fault is None:
        return [sys.executable, str(path), *args]
    code = (f"import sys\nsys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]\n"
            + textwrap.dedent(fault)
            + f"\nimport runpy\nrunpy.run_path({str(path)!r}, run_name='__main__')\n")
    return [sys.executable, "-c", code, *args]


def run(job: str, args: list[str], tmp_path: Path, *, fault: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(job, args, fault), cwd=tmp_path, env=env or job_env(tmp_path),
                          capture_output=True, text=True, timeout=timeout)


class LiveJob:
    """A job whose stderr is read as it runs, so a test can act when a log line appears."""

    def __init__(self, job: str, args: list[str], tmp_path: Path, *, fault: str | None = None,
                 env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(command(job, args, fault), cwd=tmp_path, env=env or job_env(tmp_path),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self.out: list[str] = []
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(s, buf), daemon=True)
                         for s, buf in ((self.proc.stderr, self.err), (self.proc.stdout, self.out))]
        for t in self._readers:
            t.start()

    def _read(self, stream, buf: list[str]) -> None:
        for line in stream:
            with self._changed:
                buf.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 180) -> re.Match:
        """The first stderr line matching `pattern`; fails if the job ends or the time runs out first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.err[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.err)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(t.is_alive() for t in self._readers)):
                    raise AssertionError(f"no line matching {pattern!r}; stderr:\n{self.stderr}")
                self._changed.wait(min(left, 0.5))

    def send(self, sig: signal.Signals) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def finish(self, timeout: float = 180) -> int:
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(10)
        return rc

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    @property
    def stdout(self) -> str:
        return "".join(self.out)


# Faults: Python source for `command(fault=...)`. Each wraps one function of the job.

SLOW_STEPS = """
    # Every optimizer step takes at least 0.25 s, so a test can signal the job between two given steps.
    import time
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


def kill_when_called(module: str, name: str, *, after: bool = False, nth: int = 1) -> str:
    """A fault that SIGKILLs the job on the `nth` call of module.name: before it runs, or after it returns."""
    return f"""
    import os, signal
    import {module} as _m
    _orig = _m.{name}
    _calls = [0]
    def _fault(*a, **kw):
        _calls[0] += 1
        if _calls[0] == {nth} and not {after}:
            os.kill(os.getpid(), signal.SIGKILL)
        out = _orig(*a, **kw)
        if _calls[0] == {nth} and {after}:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    _m.{name} = _fault
"""


OOM_TEXT = "CUDA out of memory. Tried to allocate 20.00 GiB (injected)"


def oom_above(model, max_rows: int, after_calls: int = 0) -> list[int]:
    """Make `model` raise torch.OutOfMemoryError on a forward of more than `max_rows` rows, once it has run
    `after_calls` forwards. Returns the list that counts the errors raised."""
    import torch

    raised: list[int] = []
    calls = [0]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        rows = (ids if ids is not None else kwargs["inputs_embeds"]).shape[0]
        calls[0] += 1
        if rows > max_rows and calls[0] > after_calls:
            raised.append(rows)
            raise torch.OutOfMemoryError(OOM_TEXT)

    inner.model.register_forward_pre_hook(hook, with_kwargs=True)
    return raised


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def assert_same_tensors(a: dict, b: dict, atol: float = 1e-6) -> None:
    import torch

    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), f"{key}: max diff {(a[key] - b[key]).abs().max()}"


def losses(run_dir: Path) -> list[tuple[int, float]]:
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    return [(h["step"], h["loss"]) for h in summary["losses"]]


def assert_clean_failure(done: subprocess.CompletedProcess, *mentions: str, codes: tuple[int, ...] = (1, 2)) -> None:
    """A user error: exit 1 or 2, every expected phrase in stderr, and no traceback."""
    assert done.returncode in codes, f"exit {done.returncode}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    for text in mentions:
        assert text in done.stderr, f"{text!r} not in stderr:\n{done.stderr}"
