"""Durable copies of a run directory, in a folder that outlives the machine: a bucket that SkyPilot mounts
(`file_mounts` in MOUNT or MOUNT_CACHED mode), an NFS share, another disk. Set by MEDCOT_DURABLE_DIR; unset, nothing
is copied. docs/cloud.md says why and how.

The run directory stays on the machine's own disk, where medcot.rundir publishes a stage by one atomic rename. A
bucket has no such rename (a mounted folder's rename is a copy of each object), and a cached mount uploads the files
it is given in any order and some time later. So the copy of a stage or checkpoint `NAME` is committed by one small
file written after all of its files, `NAME.commit.json`, listing each file with its size and sha256:

    <MEDCOT_DURABLE_DIR>/<run_name>/
        train.commit.json          train/adapter/...           (each published stage)
        checkpoints/checkpoint-40.commit.json  checkpoints/checkpoint-40/...   (the last complete checkpoints)

A restore reads the record, copies every file it lists and checks each one's size and sha256 on the way. A copy
whose record is missing, unreadable, or whose files are missing, short or different (cut off by a preemption, or not
yet uploaded by a cached mount) is never restored: the stage is redone, or training resumes from an older checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medcot.progress import Progress

log = logging.getLogger(__name__)

ENV = "MEDCOT_DURABLE_DIR"
COMMIT_SUFFIX = ".commit.json"
FORMAT = 1
# Files copied at once: a mounted bucket moves several objects faster than one (goofys and rclone upload each file
# in its own requests), and hashlib and file reads release the GIL.
PARALLEL_FILES = 4
_CHUNK = 8 << 20
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class DurableError(RuntimeError):
    """The durable folder cannot be written: the message names the folder and what to check."""


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the copy's folder, with /
    size: int
    sha256: str


@dataclass
class Commit:
    """What `NAME.commit.json` holds."""

    name: str
    files: list[FileRecord]
    committed_at: str
    extra: dict[str, Any]

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "name": self.name, "committed_at": self.committed_at, "extra": self.extra,
                           "files": [f.__dict__ for f in self.files]}, indent=1, sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> Commit:
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, not {FORMAT}")
        return cls(name=data["name"], committed_at=data["committed_at"], extra=dict(data.get("extra") or {}),
                   files=[FileRecord(f["path"], int(f["size"]), f["sha256"]) for f in data["files"]])


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


class _Copier:
    """Copies files while hashing them (one read of each byte), several at a time, with a progress line."""

    def __init__(self, desc: str, total: int) -> None:
        self.progress = Progress(desc, max(total >> 20, 1), "MiB")
        self.lock = threading.Lock()
        self.pending = 0

    def copy(self, src: Path, dst: Path) -> tuple[int, str]:
        h = hashlib.sha256()
        size = 0
        dst.parent.mkdir(parents=True, exist_ok=True)
        with src.open("rb") as fin, dst.open("wb") as fout:
            for chunk in iter(lambda: fin.read(_CHUNK), b""):
                h.update(chunk)
                fout.write(chunk)
                size += len(chunk)
                self._advance(len(chunk))
            fout.flush()
            # A mounted bucket uploads a written file at its flush or close (goofys, gcsfuse); a local disk keeps it
            # only once it is synced. Either way the file is whole before the commit record that names it.
            os.fsync(fout.fileno())
        return size, h.hexdigest()

    def _advance(self, n: int) -> None:
        with self.lock:
            self.pending += n
            mib, self.pending = self.pending >> 20, self.pending & ((1 << 20) - 1)
            self.progress.update(mib)

    def close(self) -> None:
        self.progress.close()


def _files_of(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Mirror:
    """The durable copy of one run directory: `<durable dir>/<run_name>`."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @classmethod
    def for_run(cls, run_root: Path, env: Mapping[str, str] = os.environ) -> Mirror | None:
        """The mirror of `run_root` when MEDCOT_DURABLE_DIR is set, else None."""
        base = env.get(ENV)
        return cls(Path(base) / Path(run_root).name) if base else None

    def __repr__(self) -> str:
        return f"Mirror({str(self.root)!r})"

    # ---- reading ------------------------------------------------------------------------------------

    def _record(self, name: str) -> Path:
        return self.root / f"{name}{COMMIT_SUFFIX}"

    def commit_of(self, name: str) -> Commit | None:
        """The commit record of `name`, or None when there is none or it cannot be read (cut off, a foreign file)."""
        path = self._record(name)
        try:
            return Commit.parse(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("durable: %s is not a readable commit record (%s); its copy is ignored", path, error)
            return None

    def checkpoints(self) -> list[tuple[int, Commit]]:
        """Committed checkpoints (by their records; not yet verified), newest first."""
        folder = self.root / "checkpoints"
        found = []
        for record in folder.glob(f"checkpoint-*{COMMIT_SUFFIX}") if folder.is_dir() else []:
            m = _CHECKPOINT.match(record.name[: -len(COMMIT_SUFFIX)])
            commit = self.commit_of(f"checkpoints/{record.name[: -len(COMMIT_SUFFIX)]}") if m else None
            if commit is not None:
                found.append((int(m.group(1)), commit))
        return sorted(found, key=lambda item: -item[0])

    def restore(self, name: str, dest: Path, commit: Commit | None = None) -> Commit | None:
        """Copy the committed `name` into `dest` (a new or empty folder), checking every file's size and sha256.
        Returns the commit, or None (and `dest` removed) when there is no commit or its copy does not match it."""
        commit = commit or self.commit_of(name)
        if commit is None:
            return None
        source = self.root / name
        for f in commit.files:
            try:
                size = (source / f.path).stat().st_size
            except OSError:
                size = None
            if size != f.size:
                found = "missing" if size is None else f"{size} bytes"
                log.warning("durable: the copy of %s in %s is incomplete (%s: %s, its record says %d bytes); ignored",
                            name, self.root, f.path, found, f.size)
                return None
        t0 = time.monotonic()
        copier = _Copier(f"durable: restoring {name}", commit.bytes)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            with ThreadPoolExecutor(PARALLEL_FILES) as pool:
                got = list(pool.map(lambda f: copier.copy(source / f.path, dest / f.path), commit.files))
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        finally:
            copier.close()
        for f, (size, digest) in zip(commit.files, got, strict=True):
            if (size, digest) != (f.size, f.sha256):
                log.warning("durable: %s/%s differs from its commit record (sha256 %s..., recorded %s...); the copy of "
                            "%s is ignored", source, f.path, digest[:12], f.sha256[:12], name)
                shutil.rmtree(dest, ignore_errors=True)
                return None
        seconds = time.monotonic() - t0
        log.info("durable: restored %s from %s (%d files, %s, verified) in %.1f s", name, self.root, len(commit.files),
                 _mib(commit.bytes), seconds)
        return commit

    # ---- writing ------------------------------------------------------------------------------------

    def commit(self, name: str, source: Path, extra: dict[str, Any] | None = None,
               skip: Iterable[str] = ()) -> Commit:
        """Copy the folder `source` to `<root>/<name>/`, then write its commit record.

        Any earlier commit of `name` is withdrawn first (record, then files), so that from then until the new record
        is written no copy of `name` is committed: a preemption in between leaves nothing to restore, never a mixture.
        """
        skipped = set(skip)
        files = [p for p in _files_of(source) if p.relative_to(source).as_posix() not in skipped]
        total = sum(p.stat().st_size for p in files)
        t0 = time.monotonic()
        try:
            self.withdraw(name)
            target = self.root / name
            target.mkdir(parents=True, exist_ok=True)
            copier = _Copier(f"durable: copying {name}", total)
            try:
                with ThreadPoolExecutor(PARALLEL_FILES) as pool:
                    got = list(pool.map(lambda p: copier.copy(p, target / p.relative_to(source)), files))
            finally:
                copier.close()
            commit = Commit(name=name, committed_at=_now(), extra=dict(extra or {}),
                            files=[FileRecord(p.relative_to(source).as_posix(), size, digest)
                                   for p, (size, digest) in zip(files, got, strict=True)])
            record = self._record(name)
            tmp = record.with_name(record.name + ".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                f.write(commit.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, record)
        except OSError as error:
            raise DurableError(
                f"could not copy {name} to the durable folder {self.root} ({error.strerror or error}); the local copy "
                f"in {source} is complete. Check that the bucket is mounted and writable ({ENV}={os.environ.get(ENV)})"
            ) from None
        seconds = time.monotonic() - t0
        log.info("durable: %s committed to %s (%d files, %s) in %.1f s (%s/s)", name, self.root, len(files), _mib(total),
                 seconds, _mib(int(total / max(seconds, 1e-3))))
        return commit

    def withdraw(self, name: str) -> None:
        """Remove the commit of `name`: its record first (from then on it is not committed), then its files."""
        with contextlib.suppress(FileNotFoundError):
            self._record(name).unlink()
        shutil.rmtree(self.root / name, ignore_errors=True)

    def is_committed_copy_of(self, name: str, manifest: Path) -> bool:
        """Whether the commit of stage `name` holds the stage whose manifest is `manifest` (cheap: no file is read)."""
        commit = self.commit_of(name)
        return commit is not None and commit.extra.get("manifest_sha256") == sha256_of(manifest)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
