"""Hub push, as a user runs it (`jobs/push.py` against tests/hub_server.py): a failure half-way leaves the
repo visibly incomplete (no model card) and no published `push/` stage, and the same command finishes it;
a read-only token is refused by the preflight before any training. tests/test_push.py covers the rest
(card last, foreign repos, fine-grained tokens, the token never written).
"""

from __future__ import annotations

import shutil
import signal
import time

import pytest
from huggingface_hub import constants as hf_constants
from reliability import (
    assert_clean_failure,
    job_env,
    kill_when_called,
    overrides,
    run,
    short_rows,
    single_thread,
    write_jsonl,
)

from medcot.config import load_config
from medcot.merge import merge_stage
from medcot.modeling import select_backend
from medcot.rundir import RunDir
from medcot.training import train_stage

from hub_server import HubServer

WRITE, READ = "hf_write_alice_0123456789", "hf_read_alice_0123456789"
REPO = "alice/reliability"
CARD_COMMIT = "Add model card (medcot)"


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """A run with train and merge published (in-process, seconds), copied by each test."""
    work = tmp_path_factory.mktemp("trained")
    data = write_jsonl(work / "short.jsonl", short_rows(40))
    config = load_config(None, overrides(tiny_model, data, work / "out", "run_name=push", "training.max_steps=2"))
    with single_thread():
        assert train_stage(config, select_backend(config.model)) == 0
        assert merge_stage(config, select_backend(config.model)) == 0
    return tiny_model, data, work / "out"


@pytest.fixture
def job(trained, tmp_path, monkeypatch):
    """(hub, args, env) for running the push job on a copy of the trained run against a local Hub."""
    tiny_model, data, out = trained
    shutil.copytree(out, tmp_path / "out")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with HubServer() as hub:
        hub.add_token(WRITE, "alice")
        hub.add_token(READ, "alice", role="read")
        args = overrides(tiny_model, data, tmp_path / "out", "run_name=push", "training.max_steps=2", f"push.repo_id={REPO}")
        yield hub, args, job_env(tmp_path, HF_TOKEN=WRITE, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")


def test_a_server_error_mid_push_fails_cleanly_and_the_same_command_finishes_it(job, tmp_path):
    hub, args, env = job
    hub.fail_commits = {2: 500}  # the merged model's commit
    run_dir = RunDir(tmp_path / "out" / "push")

    failed = run("push", args, tmp_path, env=env, timeout=120)

    assert_clean_failure(failed, "commit 2/3 'merged'", "HTTP 500", "rerun the push job to finish", codes=(1,))
    repo = hub.repos[REPO]
    assert "README.md" not in repo.files and "model.safetensors" not in repo.files  # no card: not a finished push
    assert not (run_dir.root / "push").exists()

    again = run("push", args, tmp_path, env=env, timeout=120)

    assert again.returncode == 0, again.stderr
    assert [c.summary for c in repo.commits][-1] == CARD_COMMIT and "model.safetensors" in repo.files
    assert run_dir.is_complete("push")
    assert "commit 1/3 'adapter': all " in again.stderr  # the adapter commit was not redone
    third = run("push", args, tmp_path, env=env, timeout=120)
    assert third.returncode == 0 and "nothing to do" in third.stderr


def test_sigkill_of_the_push_job_after_its_first_commit_then_the_rerun_completes_it(job, tmp_path):
    hub, args, env = job

    done = run("push", args, tmp_path, env=env, fault=kill_when_called("medcot.push", "_send", after=True), timeout=120)

    assert done.returncode == -signal.SIGKILL
    repo = hub.repos[REPO]
    assert "medcot.json" in repo.files and "README.md" not in repo.files
    assert not (tmp_path / "out" / "push" / "push").exists()

    again = run("push", args, tmp_path, env=env, timeout=120)

    assert again.returncode == 0, again.stderr
    assert [c.summary for c in repo.commits][-1] == CARD_COMMIT
    assert RunDir(tmp_path / "out" / "push").is_complete("push")


def test_the_preflight_job_refuses_a_read_only_token_in_seconds_before_anything_is_trained(job, tmp_path):
    hub, args, env = job
    t0 = time.monotonic()

    done = run("push", ["--preflight", *args], tmp_path, env={**env, "HF_TOKEN": READ}, timeout=60)

    assert_clean_failure(done, f"read-only and cannot create or write {REPO}", "'write' role", codes=(1,))
    assert time.monotonic() - t0 < 15
    assert REPO not in hub.repos
    assert READ not in done.stderr
