"""Secrets: canary tokens in every place medcot reads them from (the environment, a secrets folder, .env)
never appear in any file a whole pipeline run writes (run directory, W&B's files, caches under HOME) nor in
anything the jobs print; a token inside an error message, ours or a library's, is masked.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from reliability import job_env, overrides, run, short_rows, write_jsonl

from medcot.rundir import RunDir

# One canary per secret and per source; W&B keys are 40 characters.
CANARIES = {
    ("HF_TOKEN", "env"): "hf_CANARYenv0000000000000000000000000",
    ("HF_TOKEN", "secrets"): "hf_CANARYsecretsdir00000000000000000",
    ("HF_TOKEN", "dotenv"): "hf_CANARYdotenv000000000000000000000",
    ("WANDB_API_KEY", "env"): "canaryenv" + "0" * 31,
    ("WANDB_API_KEY", "secrets"): "canarysecretsdir" + "0" * 24,
    ("WANDB_API_KEY", "dotenv"): "canarydotenv" + "0" * 28,
}


def secret_sources(tmp_path: Path) -> dict[str, dict[str, str]]:
    """The environment of a job for each source: in the environment, in MEDCOT_SECRETS_DIR, or only in .env."""
    secrets, empty = tmp_path / "secrets", tmp_path / "no-secrets"
    secrets.mkdir()
    empty.mkdir(exist_ok=True)
    for name in ("HF_TOKEN", "WANDB_API_KEY"):
        (secrets / name.lower()).write_text(CANARIES[(name, "secrets")] + "\n")
    (tmp_path / ".env").write_text("".join(f"{n}={CANARIES[(n, 'dotenv')]}\n" for n in ("HF_TOKEN", "WANDB_API_KEY")))
    common = {"HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf-home"), "WANDB_MODE": "offline"}
    return {
        "env": {**common, "MEDCOT_SECRETS_DIR": str(empty), **{n: CANARIES[(n, "env")] for n in ("HF_TOKEN", "WANDB_API_KEY")}},
        "secrets": {**common, "MEDCOT_SECRETS_DIR": str(secrets)},
        "dotenv": {**common, "MEDCOT_SECRETS_DIR": str(empty)},
    }


def leaks(tmp_path: Path, outputs: list[str]) -> list[str]:
    """Where any canary appears: every file under tmp_path except the secret sources, and the given outputs."""
    sources = {tmp_path / ".env", *(tmp_path / "secrets").iterdir()}
    found = []
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p not in sources]
    for canary in CANARIES.values():
        needle = canary.encode()
        found += [str(p.relative_to(tmp_path)) for p in files if needle in p.read_bytes()]
        found += [f"output of job {i}" for i, text in enumerate(outputs) if canary in text]
    return found


@pytest.mark.slow
def test_no_canary_token_reaches_any_file_or_log_of_a_whole_pipeline_run(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "data" / "short.jsonl", short_rows(40))
    args = overrides(tiny_model, data, tmp_path / "out", "run_name=canary", "training.max_steps=4",
                     "tracking.report_to=wandb")
    envs = secret_sources(tmp_path)
    pipeline = [  # each job reads its secrets from another source, so every reading path is exercised
        (["evaluate", "--stage", "before"], "env"),
        (["train"], "secrets"),
        (["merge"], "env"),
        (["evaluate", "--stage", "after"], "dotenv"),
        (["push", "--dry-run"], "secrets"),
        (["report"], "dotenv"),
    ]
    outputs = []
    for (job, *flags), source in pipeline:
        done = run(job, [*flags, *args], tmp_path, env=job_env(tmp_path, **envs[source]))
        assert done.returncode == 0, f"{job}: {done.stderr}"
        outputs += [done.stdout, done.stderr]

    run_dir = RunDir(tmp_path / "out" / "canary")
    for stage in ("eval-before", "train", "eval-after", "merge", "report", "push-dry-run"):
        assert run_dir.is_complete(stage), stage
    wandb_files = [p for p in (run_dir.root / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in wandb_files)  # W&B did write its run: the search covers it
    assert sum(1 for p in tmp_path.rglob("*") if p.is_file()) > 50

    assert leaks(tmp_path, outputs) == []


@pytest.mark.slow
def test_a_token_inside_a_user_error_is_masked_in_the_log_and_the_saved_config(tiny_model, tmp_path):
    token = CANARIES[("HF_TOKEN", "env")]
    missing = tmp_path / token / "data.jsonl"  # e.g. a path copied from a signed URL
    env = job_env(tmp_path, HF_TOKEN=token)

    done = run("train", overrides(tiny_model, missing, tmp_path / "out", "run_name=masked"), tmp_path, env=env)

    assert done.returncode == 1
    assert "***/data.jsonl does not exist" in done.stderr and token not in done.stderr
    assert "Traceback" not in done.stderr
    saved = (tmp_path / "out" / "masked" / "config.yaml").read_text()
    assert "***" in saved and token not in saved


BUG_WITH_A_TOKEN = """
    # A bug deep in the stack whose message carries the token, as a library's HTTP error might.
    import os
    import medcot.training as _t
    def _train_stage(*a, **kw):
        raise RuntimeError("request to https://hub.example/api failed with Authorization: Bearer " + os.environ["HF_TOKEN"])
    _t.train_stage = _train_stage
"""


@pytest.mark.slow
def test_a_token_inside_an_unexpected_error_is_masked_and_the_traceback_kept(tiny_model, tmp_path):
    token = CANARIES[("HF_TOKEN", "secrets")]
    env = job_env(tmp_path, **secret_sources(tmp_path)["secrets"])

    done = run("train", overrides(tiny_model, tmp_path / "d.jsonl", tmp_path / "out"), tmp_path, env=env,
               fault=BUG_WITH_A_TOKEN)

    assert done.returncode == 1
    assert "Traceback" in done.stderr and "unexpected error (a bug" in done.stderr  # bugs keep their traceback
    assert "Authorization: Bearer ***" in done.stderr
    assert token not in done.stderr + done.stdout


def test_the_saved_config_of_a_run_never_holds_a_registered_secret(tmp_path):
    from medcot.config import RunConfig, save_config
    from medcot.secrets import register

    token = CANARIES[("HF_TOKEN", "dotenv")]
    register(token)
    config = RunConfig.model_validate({"data": {"path": f"https://data.example/{token}/rows.jsonl"}})

    save_config(config, tmp_path / "config.yaml")

    assert token not in (tmp_path / "config.yaml").read_text()
    assert json.dumps(config.to_dict()).count(token) == 1  # the config in memory is untouched
