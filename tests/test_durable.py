"""Durable copies (medcot/durable.py): a copy counts only when its commit record was written after all of its files,
and a restore takes nothing that does not match the record byte for byte. The bucket is a local folder here, which is
what a SkyPilot mount gives the jobs; the cases below are what a preemption or a cached mount's unordered uploads
leave in it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from medcot import durable
from medcot.durable import COMMIT_SUFFIX, Commit, DurableError, Mirror
from medcot.rundir import MANIFEST, RunDir
from medcot.training import (
    COMPLETE_MARK,
    complete_checkpoints,
    prune_durable_checkpoints,
    restore_durable_checkpoint,
)


def make_folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def read_folder(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


FILES = {"adapter/adapter_model.safetensors": os.urandom(300_000), "adapter/adapter_config.json": b'{"r": 16}',
         "summary.json": b'{"global_step": 8}', MANIFEST: b'{"stage": "train"}'}


@pytest.fixture
def mirror(tmp_path):
    return Mirror(tmp_path / "bucket" / "run")


@pytest.fixture
def source(tmp_path):
    return make_folder(tmp_path / "local" / "train", FILES)


def test_a_committed_folder_is_restored_byte_for_byte_with_every_file_verified(mirror, source, tmp_path):
    commit = mirror.commit("train", source)

    restored = mirror.restore("train", tmp_path / "new-vm" / "train")

    assert restored is not None and restored.bytes == commit.bytes == sum(len(b) for b in FILES.values())
    assert read_folder(tmp_path / "new-vm" / "train") == FILES
    record = json.loads((mirror.root / f"train{COMMIT_SUFFIX}").read_text())
    assert sorted(f["path"] for f in record["files"]) == sorted(FILES)


def test_files_without_their_commit_record_are_never_restored(mirror, source, tmp_path):
    # A preemption after the files and before the record: everything is in the bucket but the record.
    mirror.commit("train", source)
    (mirror.root / f"train{COMMIT_SUFFIX}").unlink()

    assert mirror.restore("train", tmp_path / "new-vm" / "train") is None
    assert not (tmp_path / "new-vm" / "train").exists()


@pytest.mark.parametrize("damage", ["missing", "short", "same size, other bytes"])
def test_a_record_whose_files_did_not_all_arrive_is_not_taken_for_a_finished_copy(mirror, source, tmp_path, damage,
                                                                                   caplog):
    # A cached mount (MOUNT_CACHED) uploads files in any order: the record may be in the bucket before a file is, or
    # while it is half there.
    mirror.commit("train", source)
    weights = mirror.root / "train" / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    if damage == "missing":
        weights.unlink()
    elif damage == "short":
        weights.write_bytes(data[: len(data) // 2])
    else:
        weights.write_bytes(bytes(b ^ 1 for b in data[:10]) + data[10:])

    with caplog.at_level(logging.WARNING, logger="medcot.durable"):
        assert mirror.restore("train", tmp_path / "new-vm" / "train") is None

    assert not (tmp_path / "new-vm" / "train").exists()
    assert "adapter/adapter_model.safetensors" in caplog.text and "ignored" in caplog.text


def test_a_cut_off_commit_record_is_ignored(mirror, source, tmp_path):
    mirror.commit("train", source)
    record = mirror.root / f"train{COMMIT_SUFFIX}"
    record.write_text(record.read_text()[:40])

    assert mirror.commit_of("train") is None
    assert mirror.restore("train", tmp_path / "new-vm" / "train") is None


def test_a_recommit_cut_off_half_way_leaves_no_copy_rather_than_a_mixture(mirror, source, tmp_path, monkeypatch):
    mirror.commit("train", source)
    (source / "summary.json").write_bytes(b'{"global_step": 9}')
    copies = []
    real_copy = durable._Copier.copy

    def copy_then_die(self, src, dst):
        if copies:
            raise KeyboardInterrupt  # the VM goes after the first file of the new copy
        copies.append(src)
        return real_copy(self, src, dst)

    monkeypatch.setattr(durable._Copier, "copy", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        mirror.commit("train", source)

    # The old record was withdrawn before any file changed: nothing is committed, so the stage is redone.
    assert mirror.commit_of("train") is None
    assert mirror.restore("train", tmp_path / "new-vm" / "train") is None


def test_an_unwritable_durable_folder_fails_with_the_folder_and_the_local_copy_named(tmp_path, source):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the bucket should be mounted")
    with pytest.raises(DurableError, match=r"could not copy train to the durable folder .*not-a-folder.*is complete"):
        Mirror(blocker / "run").commit("train", source)


def test_a_published_stage_is_committed_and_a_new_machine_restores_it_when_a_job_asks(tmp_path, monkeypatch):
    monkeypatch.setenv(durable.ENV, str(tmp_path / "bucket"))
    vm1 = RunDir(tmp_path / "vm1" / "outputs" / "run")
    with vm1.publishing("eval-before", "cfg1", {"data": "d1"}) as (tmp, _):
        (tmp / "summary.json").write_text('{"rouge": 0.1}')
    assert (tmp_path / "bucket" / "run" / f"eval-before{COMMIT_SUFFIX}").is_file()

    vm2 = RunDir(tmp_path / "vm2" / "outputs" / "run")
    assert vm2.check_done("eval-before", "cfg1", {"data": "d1"}, force=False)

    assert (vm2.stage("eval-before") / "summary.json").read_text() == '{"rouge": 0.1}'
    assert vm2.manifest("eval-before").identity() == vm1.manifest("eval-before").identity()


def test_a_stage_finished_here_but_never_committed_is_committed_when_its_job_runs_again(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "outputs" / "run")
    with run.publishing("merge", "cfg", {}) as (tmp, _):  # no durable folder yet: a copy cut off before its commit
        (tmp / "model.safetensors").write_bytes(b"w" * 1000)
    monkeypatch.setenv(durable.ENV, str(tmp_path / "bucket"))
    run = RunDir(tmp_path / "outputs" / "run")

    assert run.check_done("merge", "cfg", {}, force=False)

    assert run.mirror.is_committed_copy_of("merge", run.stage("merge") / MANIFEST)


def test_only_the_first_process_of_a_machine_restores(tmp_path, monkeypatch):
    monkeypatch.setenv(durable.ENV, str(tmp_path / "bucket"))
    with RunDir(tmp_path / "vm1" / "run").publishing("train", "cfg", {}) as (tmp, _):
        (tmp / "summary.json").write_text("{}")
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second worker on a new machine

    assert RunDir(tmp_path / "vm2" / "run").manifest("train") is None
    assert not (tmp_path / "vm2" / "run" / "train").exists()


def checkpoint(folder: Path, step: int, payload: bytes = b"state") -> Path:
    path = make_folder(folder / f"checkpoint-{step}", {"adapter_model.safetensors": payload * 100,
                                                        "optimizer.pt": payload, "trainer_state.json": b"{}"})
    (path / COMPLETE_MARK).write_text(f"{step}\n")
    return path


def test_a_new_machine_resumes_from_the_newest_committed_checkpoint_of_its_config_that_verifies(tmp_path, mirror):
    old = tmp_path / "old-vm"
    for step in (2, 4, 6):
        mirror.commit(f"checkpoints/checkpoint-{step}", checkpoint(old, step, b"s%d" % step),
                      extra={"config_hash": "ours"}, skip=[COMPLETE_MARK])
    mirror.commit("checkpoints/checkpoint-8", checkpoint(old, 8), extra={"config_hash": "another config"})
    (mirror.root / "checkpoints" / "checkpoint-6" / "optimizer.pt").write_bytes(b"cut")  # 6 never fully arrived
    new = tmp_path / "new-vm" / "checkpoints"

    restored = restore_durable_checkpoint(mirror, new, "ours")

    assert restored == new / "checkpoint-4"
    assert complete_checkpoints(new) == [new / "checkpoint-4"]
    assert (restored / "optimizer.pt").read_bytes() == b"s4"
    assert not list(new.glob(".restore-*"))


def test_a_machine_with_a_newer_complete_checkpoint_of_its_own_keeps_it(tmp_path, mirror):
    mirror.commit("checkpoints/checkpoint-4", checkpoint(tmp_path / "old", 4), extra={"config_hash": "ours"})
    here = tmp_path / "vm" / "checkpoints"
    checkpoint(here, 6)

    assert restore_durable_checkpoint(mirror, here, "ours") is None
    assert complete_checkpoints(here) == [here / "checkpoint-6"]


def test_the_durable_folder_keeps_as_many_checkpoints_as_save_total_limit_and_none_of_another_config(tmp_path, mirror):
    for step, config in ((2, "old"), (2, "ours"), (4, "ours"), (6, "ours")):
        mirror.commit(f"checkpoints/checkpoint-{step}", checkpoint(tmp_path / config, step), extra={"config_hash": config})
    mirror.commit("checkpoints/checkpoint-10", checkpoint(tmp_path / "x", 10), extra={"config_hash": "old"})

    prune_durable_checkpoints(mirror, "ours", keep=2)

    assert [(step, c.extra["config_hash"]) for step, c in mirror.checkpoints()] == [(6, "ours"), (4, "ours")]
    assert sorted(p.name for p in (mirror.root / "checkpoints").iterdir()) == [
        "checkpoint-4", f"checkpoint-4{COMMIT_SUFFIX}", "checkpoint-6", f"checkpoint-6{COMMIT_SUFFIX}"]


def test_a_commit_record_round_trips_and_refuses_another_format():
    commit = Commit("train", [durable.FileRecord("a", 1, "00")], "2026-12-03T00:00:00+00:00", {"k": "v"})
    assert Commit.parse(commit.to_json()) == commit
    with pytest.raises(ValueError, match="format"):
        Commit.parse(commit.to_json().replace('"format": 1', '"format": 2'))
