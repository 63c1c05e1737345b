"""A SkyPilot node on this machine, for the launch files' tests: a fresh "VM" (its own HOME, the working tree synced to
~/sky_workdir as SkyPilot's workdir sync does), and the launch file's `setup` and `run` executed there as SkyPilot's
runtime executes them. The scripts come from SkyPilot itself (tests/skypilot_task.py, run in .venv-cloud): the task
read by its parser, its envs, secrets and SKYPILOT_* variables exported, `run` wrapped by its task code generator.
Each script runs in a session of its own, so that a test can SIGKILL every process of it, as a reclaimed VM does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLOUD_PYTHON = ROOT / ".venv-cloud" / "bin" / "python"
TASK_READER = ROOT / "tests" / "skypilot_task.py"


def skypilot_task(launch_file: Path, *, env: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
                  rank: int = 0, ips: list[str] | None = None, gpus_per_node: int = 1) -> dict:
    """What SkyPilot runs on node `rank` of `launch_file` with these --env and --secret values (tests/skypilot_task.py)."""
    spec = {"env": env or {}, "secrets": secrets or {}, "rank": rank, "ips": ips, "gpus_per_node": gpus_per_node}
    proc = subprocess.run([str(CLOUD_PYTHON), str(TASK_READER), str(launch_file), json.dumps(spec)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"SkyPilot refused {launch_file}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lay_vm(home: Path) -> Path:
    """A new VM's home with the working tree in ~/sky_workdir: the files git tracks or would track (SkyPilot's workdir
    sync skips what .gitignore names: the virtualenvs, outputs)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    workdir = home / "sky_workdir"
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, workdir / name)
    return workdir


class NodeScript:
    """One of SkyPilot's scripts running on a simulated VM, its output read as it comes."""

    def __init__(self, script: str, home: Path, env: dict[str, str], name: str):
        path = home / f".{name}.sh"
        path.write_text(script)
        # SkyPilot runs `/bin/bash -i SCRIPT` (sky/skylet/log_lib.py); without a terminal, job control stays off and
        # every process stays in this session.
        self.proc = subprocess.Popen(["/bin/bash", "-i", str(path)], cwd=home, env={**env, "HOME": str(home)},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    if m := regex.search(line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no line matching {pattern!r}; output:\n{self.output[-6000:]}")
                self._changed.wait(min(left, 0.5))

    def kill_vm(self, sig: signal.Signals = signal.SIGKILL) -> float:
        """`sig` to every process of the script's session at once: SIGKILL as a reclaimed VM that gives no grace,
        SIGTERM as a VM's shutdown after a preemption notice."""
        sid = self.proc.pid
        victims = [sid]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # field 6 of /proc/PID/stat, the session id
                victims.append(int(stat.parent.name))
        t = time.monotonic()
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return t

    def finish(self, timeout: float = 900) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(10)
        return rc


def node_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment a VM's scripts start from: PATH without this virtualenv, offline, one thread, no secrets."""
    venv_bin = str(Path(os.sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    no_secrets = tmp_path / "no-secrets"
    no_secrets.mkdir(exist_ok=True)
    return {"PATH": path, "LANG": "C.UTF-8", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "MEDCOT_SECRETS_DIR": str(no_secrets), **extra}
