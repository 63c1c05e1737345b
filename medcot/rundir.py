"""The run directory: how stages hand work to each other without ever reading half-written output.

Layout of `<output_dir>/<run_name>/`:
    config.yaml          resolved config of the latest job (no secrets)
    checkpoints/         the train job's working area (resume points), not a stage output
    eval-before/ train/ eval-after/ merge/ export/ lm-eval/ push/    published stage outputs, each with manifest.json

A stage writes into `.staging/<stage>-<random>/` and is published by one atomic rename once its
manifest is written. A stage folder without `manifest.json` was never published and is ignored. A write that
fails on a full disk becomes a ResourceError that names the folder and what was kept (raise_if_disk_full).

With MEDCOT_DURABLE_DIR set (medcot.durable), every published stage is also copied to that folder, and a stage that
this machine lacks is restored from there, verified, when a job first asks for it: a job on a new machine carries on
where the last one stopped.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from medcot.durable import Mirror, sha256_of

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
STAGES = ("eval-before", "train", "merge", "eval-after", "export", "lm-eval", "push")
# The push job's --dry-run publishes its plan and model card here, like a stage.
DRY_RUN_DIR = "push-dry-run"
# What to run to produce each stage, for messages.
PRODUCER = {
    "eval-before": "the evaluate job with --stage before (make evaluate STAGE=before)",
    "train": "the train job (make train)",
    "merge": "the merge job (make merge)",
    "eval-after": "the evaluate job with --stage after (make evaluate STAGE=after)",
    "export": "the export job (make export)",
    "lm-eval": "the lm-eval job (make lm-eval TASKS=...)",
    "push": "the push job (make push)",
}


class StageError(RuntimeError):
    """A stage cannot run or publish: missing inputs, or a finished stage that conflicts with the config."""


# ---- a full disk: what a failed write says, for every stage that writes ----------------------------------------

# torch's zip writer reports a full disk as "unexpected pos ..." with no errno, so a failed write is also
# called a full disk when the filesystem has less than this left.
LOW_DISK_BYTES = 64 << 20


class ResourceError(StageError):
    """The stage ran out of disk (here) or GPU memory (medcot.resources); the message lists what to change. A
    StageError, so every job reports it as a user error (one message, no traceback)."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def free_bytes(folder: Path) -> int | None:
    for path in (folder, *folder.parents):
        if path.exists():
            return shutil.disk_usage(path).free
    return None


def is_disk_full(error: BaseException, folder: Path) -> bool:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text:  # safetensors (Rust) wraps the OSError
            return True
    free = free_bytes(folder)
    return isinstance(error, (OSError, RuntimeError)) and free is not None and free < LOW_DISK_BYTES


def first_line(error: BaseException) -> str:
    """An error's first line, short enough for a one-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def size_text(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def disk_message(folder: Path, error: BaseException, then: str) -> str:
    free = free_bytes(folder)
    left = f"{size_text(free)} left" if free is not None else "no space left"
    return (f"disk full while writing to {folder} ({left}; {first_line(error)}). {then} Free some space, or "
            f"set output_dir to a larger disk, and rerun the same command: finished work is kept.")


def raise_if_disk_full(error: BaseException, folder: Path, kept: str = "") -> None:
    """Raise a ResourceError in place of `error` when it comes from a full disk under `folder`."""
    if isinstance(error, Exception) and not isinstance(error, StageError) and is_disk_full(error, folder):
        raise ResourceError(disk_message(folder, error, kept)) from None


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("medcot", "torch", "transformers", "trl", "peft", "datasets", "bitsandbytes", "unsloth"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def hash_tree(path: Path) -> str:
    """Content hash of a file or folder (names and bytes), ignoring the manifest itself."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


@dataclass
class Manifest:
    stage: str
    config_hash: str
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> content or manifest hash
    started_at: str = ""
    finished_at: str = ""
    duration_s: float = 0.0
    versions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        return cls(**json.loads(path.read_text(encoding="utf-8")))

    def identity(self) -> str:
        """What a later stage records as this stage's hash: config and inputs, not timings."""
        return hashlib.sha256(json.dumps([self.stage, self.config_hash, self.inputs], sort_keys=True).encode()).hexdigest()[:16]


class RunDir:
    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.mirror = Mirror.for_run(self.root)

    def stage(self, name: str) -> Path:
        return self.root / name

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def manifest(self, name: str) -> Manifest | None:
        path = self.stage(name) / MANIFEST
        if not path.is_file() and not self._restore(name):
            return None
        try:
            return Manifest.read(path)
        except (json.JSONDecodeError, TypeError):
            return None

    def is_complete(self, name: str) -> bool:
        return self.manifest(name) is not None

    def require(self, name: str, needed_by: str) -> Manifest:
        """The manifest of a finished stage, or a StageError that says which job to run first."""
        manifest = self.manifest(name)
        if manifest is None:
            state = "is incomplete (no manifest.json)" if self.stage(name).exists() else "does not exist"
            raise StageError(
                f"{needed_by} needs the '{name}' stage, but {self.stage(name)} {state}; run {PRODUCER.get(name, name)} first"
            )
        return manifest

    def check_done(self, name: str, config_hash: str, inputs: dict[str, str], force: bool) -> bool:
        """True when the stage is already published with this config and inputs (the job has nothing to do).
        A published stage with another config or inputs is refused unless `force`, never mixed."""
        manifest = self.manifest(name)
        if manifest is None:
            return False
        if manifest.config_hash == config_hash and manifest.inputs == inputs:
            # Finished here, but perhaps cut off before its durable copy was committed: commit it now.
            if self.mirror and not self.mirror.is_committed_copy_of(name, self.stage(name) / MANIFEST):
                self._commit(name)
            return True
        if not force:
            changed = "config" if manifest.config_hash != config_hash else "inputs (" + ", ".join(
                sorted(k for k in set(inputs) | set(manifest.inputs) if inputs.get(k) != manifest.inputs.get(k))) + ")"
            raise StageError(
                f"stage '{name}' in {self.root} was finished with a different {changed}; "
                f"pass --force to redo it, or choose another run_name to keep both"
            )
        return False

    @contextlib.contextmanager
    def publishing(self, name: str, config_hash: str, inputs: dict[str, str] | None = None,
                   started: float | None = None) -> Iterator[tuple[Path, Manifest]]:
        """Yield a fresh staging folder and its manifest; on clean exit publish it as `<root>/<name>` atomically.

        `started`: the `time.monotonic()` at which the stage's work began (model loading, training...), so that the
        manifest's duration is the stage's, not only the writing's. On an exception the staging folder is removed
        and any earlier published result stays as it was.
        """
        staging_root = self.root / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers(name)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=staging_root))
        t0 = time.monotonic() if started is None else started
        manifest = Manifest(stage=name, config_hash=config_hash, inputs=dict(inputs or {}),
                            started_at=_now(time.monotonic() - t0), versions=versions())
        try:
            yield tmp, manifest
            manifest.finished_at = _now()
            manifest.duration_s = round(time.monotonic() - t0, 2)
            _write_json_atomic(tmp / MANIFEST, manifest.__dict__)
            _fsync_dir(tmp)
            self._swap_in(tmp, self.stage(name))
        except BaseException as error:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_if_disk_full(error, self.root, f"Nothing of '{name}' was published; an earlier result is unchanged.")
            raise
        if self.mirror:
            self._commit(name)

    def _commit(self, name: str) -> None:
        final = self.stage(name)
        self.mirror.commit(name, final, extra={"manifest_sha256": sha256_of(final / MANIFEST)})

    def _restore(self, name: str) -> bool:
        """Bring the committed durable copy of stage `name` here, verified, published like a stage. Only one process
        per machine restores (torchrun's workers other than each node's first read what that one brought)."""
        if self.mirror is None or os.environ.get("LOCAL_RANK", "0") != "0" or self.mirror.commit_of(name) is None:
            return False
        staging_root = self.root / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers(name)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=staging_root))
        if self.mirror.restore(name, tmp) is None or not (tmp / MANIFEST).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        self._swap_in(tmp, self.stage(name))
        return True

    def _swap_in(self, new: Path, final: Path) -> None:
        if final.exists():
            # Two renames: the old result is moved aside whole, then the new one takes its name. A crash
            # between them leaves no published stage (safe: it is redone), never a mixture.
            trash = final.with_name(f".old-{final.name}-{os.getpid()}-{time.time_ns()}")
            os.replace(final, trash)
            os.replace(new, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(new, final)
        _fsync_dir(final.parent)

    def _remove_leftovers(self, name: str) -> None:
        """Remove what an earlier run of this stage left when it was killed mid-write (never published), so
        that repeated preemptions do not fill the disk with copies of a model."""
        own = re.compile(rf"^(\.staging/{re.escape(name)}-[a-z0-9_]{{8}}|\.old-{re.escape(name)}-\d+-\d+)$")
        for path in [*(self.root / ".staging").glob("*"), *self.root.glob(".old-*")]:
            if own.match(path.relative_to(self.root).as_posix()):
                shutil.rmtree(path, ignore_errors=True)



def _now(seconds_ago: float = 0.0) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds_ago)).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (tmp file, fsync, rename), so a reader sees the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(path, data)
