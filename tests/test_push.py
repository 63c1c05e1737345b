"""The push stage against a local Hub (tests/hub_server.py): repo creation, files, card, preflight, reruns."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download

from medcot.config import RunConfig
from medcot.push import CARD_MARKER, PLAN_FILE, PushError, build_model_card, preflight, push, push_stage
from medcot.rundir import RunDir, StageError, write_json

from hub_server import HubServer  # tests/ is on sys.path under pytest's default import mode

ROOT = Path(__file__).resolve().parents[1]
WRITE, READ, INVALID = "hf_write_alice_0123456789", "hf_read_alice_0123456789", "hf_invalid_0123456789"
FG_OTHER, FG_ALICE = "hf_fg_other_lab_0123456789", "hf_fg_alice_0123456789"
REPO = "alice/medcot-demo"
BEFORE = {"format": {"rate": 0.35}, "rouge_l": {"mean": 0.112}, "heldout_loss": {"loss": 2.41},
          "reasoning_tokens": {"median": 612}}
AFTER = {"format": {"rate": 0.92}, "rouge_l": {"mean": 0.187}, "heldout_loss": {"loss": 1.73},
         "reasoning_tokens": {"median": 388}}


@pytest.fixture
def hub(monkeypatch):
    # conftest.py turns huggingface_hub's offline mode on for every test; these talk to a server on 127.0.0.1.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    with HubServer() as server:
        server.add_token(WRITE, "alice", orgs={"medlab": "write", "readers-club": "read"})
        server.add_token(READ, "alice", role="read")
        server.add_token(FG_OTHER, "alice", role="fineGrained", scoped=[
            {"entity": {"type": "org", "name": "other-lab"}, "permissions": ["repo.content.read", "repo.write"]},
            {"entity": {"type": "user", "name": "alice"}, "permissions": ["repo.content.read"]},
        ])
        server.add_token(FG_ALICE, "alice", role="fineGrained", scoped=[
            {"entity": {"type": "user", "name": "alice"}, "permissions": ["repo.content.read", "repo.write"]},
        ])
        yield server


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a name or open a connection fails the test."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args))
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def make_config(tmp_path: Path, **push) -> RunConfig:
    return RunConfig.model_validate({
        "run_name": "demo", "output_dir": str(tmp_path / "outputs"),
        "lora": {"r": 8, "lora_alpha": 16},
        "training": {"max_steps": 30, "learning_rate": 1e-4},
        "push": {"repo_id": REPO, **push},
    })


def _files(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def make_run(config: RunConfig, stages=("train", "eval-before", "eval-after", "merge"), data_source: str = "sample") -> RunDir:
    """A run directory with small real files in every stage, published as the stages publish them."""
    rng = random.Random(0)
    adapter = {
        "adapter_config.json": json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}).encode(),
        "adapter_model.safetensors": rng.randbytes(40_000),
        "tokenizer.json": b'{"version": "1.0"}',
        "tokenizer_config.json": b'{"eos_token": "<|end|>"}',
        "README.md": b"peft's template card, replaced by ours",
    }
    run = RunDir(config.run_dir)
    h = config.section_hash("model")
    if "train" in stages:
        with run.publishing("train", h) as (tmp, manifest):
            _files(tmp / "adapter", adapter)
            write_json(tmp / "summary.json", {"global_step": 30, "train_loss": 1.2345, "data": {
                "source": data_source, "rows_read": 130, "train_rows": 100, "heldout_rows": 25, "dropped_total": 5}})
    for stage, summary in (("eval-before", BEFORE), ("eval-after", AFTER)):
        if stage in stages:
            with run.publishing(stage, h) as (tmp, manifest):
                write_json(tmp / "summary.json", summary)
    if "merge" in stages:
        with run.publishing("merge", h) as (tmp, manifest):
            _files(tmp / "adapter", adapter)
            _files(tmp / "model", {
                "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
                "generation_config.json": b'{"do_sample": false}',
                "model.safetensors": rng.randbytes(200_000),
                "tokenizer.json": b'{"version": "1.0"}',
                "tokenizer_config.json": b'{"eos_token": "<|end|>"}',
            })
    return run


def expected_files(run: RunDir) -> dict[str, bytes]:
    """What a push of adapter + merged must put in the repo, besides medcot.json and README.md."""
    files = {f"adapter/{p.name}": p.read_bytes() for p in (run.stage("merge") / "adapter").iterdir() if p.name != "README.md"}
    files.update({p.name: p.read_bytes() for p in (run.stage("merge") / "model").iterdir()})
    return files


def front_matter(card: str) -> dict:
    return yaml.safe_load(re.match(r"---\n(.*?)\n---\n", card, re.S).group(1))


# ---- a complete push --------------------------------------------------------------------------------


def test_push_creates_private_repo_with_identical_files_and_card_last(tmp_path, hub):
    config = make_config(tmp_path)
    run = make_run(config)

    result = push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out", endpoint=hub.url)

    repo = hub.repos[REPO]
    assert repo.private is True
    for path, data in expected_files(run).items():
        assert repo.files[path] == data, path
    assert "README.md" not in [p for p in repo.files if p.startswith("adapter/")]
    assert json.loads(repo.files["medcot.json"])["made_by"] == "medcot"
    assert [c.summary for c in repo.commits] == [
        "initial commit", "Upload LoRA adapter (medcot)", "Upload merged float16 model (medcot)", "Add model card (medcot)"]
    assert repo.commits[-1].paths == ["README.md"]
    assert repo.files["README.md"] == (tmp_path / "out" / "README.md").read_bytes()
    assert result["revision"] == repo.sha
    downloaded = hf_hub_download(REPO, "model.safetensors", token=WRITE, endpoint=hub.url, cache_dir=tmp_path / "cache")
    assert Path(downloaded).read_bytes() == (run.stage("merge") / "model" / "model.safetensors").read_bytes()


def test_rerun_of_a_complete_push_uploads_nothing(tmp_path, hub):
    config = make_config(tmp_path)
    run = make_run(config)
    push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out1", endpoint=hub.url)
    commits = len(hub.repos[REPO].commits)

    result = push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out2", endpoint=hub.url)

    assert len(hub.repos[REPO].commits) == commits
    assert [c["uploaded"] for c in result["commits"]] == [0, 0, 0]


def test_adapter_only_push_takes_train_adapter_to_repo_root_without_merge_stage(tmp_path, hub):
    config = make_config(tmp_path, what=["adapter"])
    run = make_run(config, stages=("train",))

    push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out", endpoint=hub.url)

    files = hub.repos[REPO].files
    assert files["adapter_model.safetensors"] == (run.stage("train") / "adapter" / "adapter_model.safetensors").read_bytes()
    assert "config.json" not in files
    card = files["README.md"].decode()
    assert front_matter(card)["library_name"] == "peft"
    assert 'PeftModel.from_pretrained(base, "alice/medcot-demo")' in card
    assert "This run published no before/after evaluation." in card


def test_merged_push_without_merge_stage_says_to_run_the_merge_job(tmp_path, hub):
    config = make_config(tmp_path)
    run = make_run(config, stages=("train",))

    with pytest.raises(StageError, match=r"needs the 'merge' stage.*make merge"):
        push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out", endpoint=hub.url)
    assert REPO not in hub.repos


def publish_export(run: RunDir, merge_identity: str | None = None) -> dict[str, bytes]:
    """An export stage as the export job publishes it (its manifest names the files), made from the run's merge."""
    rng = random.Random(1)
    files = {"demo-Q8_0.gguf": b"GGUF" + rng.randbytes(150_000), "demo-F16.gguf": b"GGUF" + rng.randbytes(280_000),
             "Modelfile": b'FROM ./demo-Q8_0.gguf\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER stop "<|im_end|>"\n',
             "template": b"{{ .Prompt }}", "params": b'{"stop": ["<|im_end|>"]}\n'}
    inputs = {"merge": merge_identity or run.manifest("merge").identity()}
    with run.publishing("export", "types", inputs) as (tmp, manifest):
        _files(tmp, {**files, "config.yaml": b"run_name: demo\n"})
        manifest.extra = {"files": [{"file": n, "type": n.split("-")[1].removesuffix(".gguf").lower(), "bytes": len(d)}
                                    for n, d in files.items() if n.endswith(".gguf")],
                          "ollama_files": ["Modelfile", "template", "params"], "stop": ["<|im_end|>"]}
    return files


def test_push_uploads_the_gguf_files_and_ollama_files_at_the_root_before_the_card(tmp_path, hub):
    config = make_config(tmp_path)
    run = make_run(config)
    gguf_files = publish_export(run)

    push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out", endpoint=hub.url)

    repo = hub.repos[REPO]
    assert [c.summary for c in repo.commits] == [
        "initial commit", "Upload LoRA adapter (medcot)", "Upload merged float16 model (medcot)",
        "Upload GGUF files and Ollama Modelfile (medcot)", "Add model card (medcot)"]
    assert sorted(repo.commits[3].paths) == sorted(gguf_files)
    assert all(repo.files[name] == data for name, data in gguf_files.items())
    assert "config.yaml" not in repo.files  # the export stage's own record, not the model's
    assert json.loads(repo.files["medcot.json"])["layout"]["gguf"] == "."
    card = repo.files["README.md"].decode()
    assert "gguf" in front_matter(card)["tags"]
    assert "ollama run hf.co/alice/medcot-demo:Q8_0" in card and "llama-cli -m demo-Q8_0.gguf" in card
    assert "| `demo-F16.gguf` | F16 |" in card and "stops at `<|im_end|>`" in card


def test_gguf_only_push_without_an_export_stage_says_to_run_the_export_job(tmp_path, hub):
    config = make_config(tmp_path, what=["gguf"])
    run = make_run(config)

    with pytest.raises(StageError, match=r"needs the 'export' stage.*make export"):
        push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out", endpoint=hub.url)
    assert REPO not in hub.repos


def test_gguf_files_of_an_earlier_merge_are_not_pushed_with_a_new_one(tmp_path, no_network):
    config = make_config(tmp_path)
    run = make_run(config)
    publish_export(run, merge_identity="an-earlier-merge")

    with pytest.raises(StageError, match=r"were not written from the merged model .*make export ARGS=--force"):
        push(config, run.root, None, dry_run=True, out_dir=tmp_path / "out")


# ---- the model card ---------------------------------------------------------------------------------


def test_card_has_metadata_data_hyperparameters_eval_table_and_not_medical_advice(tmp_path):
    config = make_config(tmp_path)
    run = make_run(config)

    card = build_model_card(config, run.root)

    meta = front_matter(card)
    assert meta["base_model"] == "unsloth/DeepSeek-R1-Distill-Llama-8B"
    assert meta["datasets"] == ["FreedomIntelligence/medical-o1-reasoning-SFT"]
    assert meta["library_name"] == "transformers"  # the merged model sits at the repo root
    assert meta["pipeline_tag"] == "text-generation" and meta["language"] == "en" and "medcot" in meta["tags"]
    assert CARD_MARKER in card
    assert "100 rows for training and 25 held out for evaluation (of 130 read; 5 dropped" in card
    assert "| `r` | `8` |" in card and "| `lora_alpha` | `16` |" in card
    assert "| `learning_rate` | `0.0001` |" in card and "| `max_steps` | `30` |" in card
    # The table is medcot.metrics.format_table's: check each metric's before and after values, not its layout.
    for row in (r"\| format rate .*\| 0\.350 .*\| 0\.920 ", r"\| ROUGE-L .*\| 0\.112 .*\| 0\.187 ",
                r"\| held-out loss .*\| 2\.410 .*\| 1\.730 ", r"\| median reasoning tokens .*\| 612\.0 .*\| 388\.0 "):
        assert re.search(row, card), row
    assert "**Not medical advice.**" in card
    assert "### Question:\n{question}\n### Response:\n<think>" in card
    assert 'AutoModelForCausalLM.from_pretrained("alice/medcot-demo"' in card
    assert "Trained for 30 optimizer steps; final training loss 1.2345." in card


# ---- dry run ----------------------------------------------------------------------------------------


def test_dry_run_writes_plan_and_card_and_opens_no_socket(tmp_path, no_network):
    config = make_config(tmp_path)
    run = make_run(config)
    out = tmp_path / "dry"

    push(config, run.root, None, dry_run=True, out_dir=out)

    assert no_network == []
    plan = json.loads((out / PLAN_FILE).read_text())
    assert plan["repo_id"] == REPO and plan["private"] is True
    assert [c["name"] for c in plan["commits"]] == ["adapter", "merged", "card"]
    assert [f["path_in_repo"] for f in plan["commits"][-1]["files"]] == ["README.md"]
    assert plan["commits"][0]["files"][0]["path_in_repo"] == "medcot.json"
    planned = {f["path_in_repo"]: f for c in plan["commits"] for f in c["files"]}
    for path, data in expected_files(run).items():
        assert planned[path]["size"] == len(data)
        assert planned[path]["sha256"] == hashlib.sha256(data).hexdigest()
    assert planned["model.safetensors"]["source"] == "merge/model/model.safetensors"
    assert (out / "README.md").read_text().startswith("---\n")


def test_dry_run_without_repo_id_uses_a_placeholder(tmp_path, no_network):
    config = make_config(tmp_path, repo_id=None)
    run = make_run(config)

    push(config, run.root, None, dry_run=True, out_dir=tmp_path / "dry")

    plan = json.loads((tmp_path / "dry" / PLAN_FILE).read_text())
    assert plan["repo_id"] == "<your-username>/demo" and plan["repo_id_is_placeholder"] is True


def test_real_push_without_repo_id_fails_before_any_network(tmp_path, no_network):
    config = make_config(tmp_path, repo_id=None)
    run = make_run(config)

    with pytest.raises(PushError, match="push.repo_id is not set"):
        push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out")
    assert no_network == []


# ---- preflight --------------------------------------------------------------------------------------


def test_preflight_with_write_token_returns_the_username(hub):
    assert preflight(REPO, WRITE, hub.url) == "alice"
    assert preflight("medlab/medcot-demo", WRITE, hub.url) == "alice"
    assert preflight(REPO, FG_ALICE, hub.url) == "alice"


def test_preflight_without_token_says_to_set_hf_token(no_network):
    with pytest.raises(PushError, match="no Hugging Face token: set HF_TOKEN"):
        preflight(REPO, None)


def test_preflight_with_invalid_token_says_it_was_rejected(hub):
    with pytest.raises(PushError, match=r"HF token was rejected .*401.*create a write token"):
        preflight(REPO, INVALID, hub.url)


def test_preflight_with_read_only_token_asks_for_a_write_token(hub):
    with pytest.raises(PushError, match=r"read-only and cannot create or write alice/medcot-demo.*'write' role"):
        preflight(REPO, READ, hub.url)


def test_preflight_with_fine_grained_token_for_another_namespace_names_what_it_can_write(hub):
    with pytest.raises(PushError, match=r"no write access to 'alice' \(it can write to: other-lab\)"):
        preflight(REPO, FG_OTHER, hub.url)


def test_preflight_refuses_a_namespace_that_is_not_yours(hub):
    with pytest.raises(PushError, match=r"'bob' is neither your username \(alice\) nor one of your organisations"):
        preflight("bob/medcot-demo", WRITE, hub.url)
    with pytest.raises(PushError, match=r"read role in the organisation 'readers-club'"):
        preflight("readers-club/medcot-demo", WRITE, hub.url)


def test_preflight_in_offline_mode_says_to_unset_hf_hub_offline(monkeypatch, no_network):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match="HF_HUB_OFFLINE is set"):
        preflight(REPO, WRITE)


def test_preflight_refuses_a_repo_id_without_namespace(no_network):
    with pytest.raises(PushError, match="is not 'namespace/name'"):
        preflight("medcot-demo", WRITE)


# ---- existing repos and failures --------------------------------------------------------------------


def test_existing_repo_not_made_by_medcot_is_refused(tmp_path, hub):
    hub.seed_repo(REPO, {"README.md": b"# someone's model\n", "config.json": b"{}"})
    config = make_config(tmp_path)
    run = make_run(config)

    with pytest.raises(PushError, match=r"was not made by medcot .*push.allow_foreign_repo=true"):
        push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out", endpoint=hub.url)
    assert hub.repos[REPO].files["README.md"] == b"# someone's model\n"


def test_existing_repo_not_made_by_medcot_is_pushed_into_when_allowed(tmp_path, hub):
    hub.seed_repo(REPO, {"notes.txt": b"keep me"})
    config = make_config(tmp_path, allow_foreign_repo=True)
    run = make_run(config)

    push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out", endpoint=hub.url)

    files = hub.repos[REPO].files
    assert files["notes.txt"] == b"keep me"
    assert CARD_MARKER in files["README.md"].decode()


def test_server_error_mid_upload_then_rerun_completes_the_repo(tmp_path, hub):
    config = make_config(tmp_path)
    run = make_run(config)
    hub.fail_commits = {2: 500}  # the merged model's commit

    with pytest.raises(PushError, match=r"commit 2/3 'merged' .*HTTP 500.*rerun the push job to finish"):
        push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out1", endpoint=hub.url)
    assert "README.md" not in hub.repos[REPO].files
    assert "model.safetensors" not in hub.repos[REPO].files

    result = push(config, run.root, WRITE, dry_run=False, out_dir=tmp_path / "out2", endpoint=hub.url)

    repo = hub.repos[REPO]
    for path, data in expected_files(run).items():
        assert repo.files[path] == data, path
    assert [c.summary for c in repo.commits] == [
        "initial commit", "Upload LoRA adapter (medcot)", "Upload merged float16 model (medcot)", "Add model card (medcot)"]
    assert [c["uploaded"] for c in result["commits"]] == [0, 5, 1]


# ---- the job, as a user runs it ---------------------------------------------------------------------


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_TOKEN_PATH", "HF_ENDPOINT", "HF_HUB_OFFLINE", "WANDB_API_KEY")}
    secrets = tmp_path / "no-secrets"
    secrets.mkdir(exist_ok=True)
    env.update(MEDCOT_SECRETS_DIR=str(secrets), HF_HOME=str(tmp_path / "hf-home"), **extra)
    return env


def run_job(tmp_path: Path, config: RunConfig, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "push.py"), "--config", str(path), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_push_job_publishes_the_push_stage_and_never_writes_or_logs_the_token(tmp_path, hub):
    canary = "hf_CANARY_d0_not_leak_4242424242"
    hub.add_token(canary, "alice")
    # The canary also hides in the data path, as a signed URL would: the card and medcot.json must mask it.
    config = make_config(tmp_path).model_copy(deep=True)
    config.data.path = f"https://data.example.org/{canary}/medical.jsonl"
    run = make_run(config, data_source=config.data.path)

    done = run_job(tmp_path, config, env=job_env(tmp_path, HF_TOKEN=canary, HF_ENDPOINT=hub.url))

    assert done.returncode == 0, done.stderr
    assert "complete at revision" in done.stderr
    manifest = json.loads((run.stage("push") / "manifest.json").read_text())
    assert manifest["extra"]["revision"] == hub.repos[REPO].sha
    assert {p.name for p in run.stage("push").iterdir()} >= {"push-plan.json", "README.md", "push-result.json"}
    assert "***" in hub.repos[REPO].files["README.md"].decode()
    written = [p.read_bytes() for p in run.stage("push").rglob("*") if p.is_file()]
    for data in written + list(hub.repos[REPO].files.values()) + [done.stderr.encode(), done.stdout.encode()]:
        assert canary.encode() not in data


def test_preflight_job_with_bad_token_exits_1_within_seconds(tmp_path, hub):
    config = make_config(tmp_path)
    t0 = time.monotonic()

    done = run_job(tmp_path, config, "--preflight", env=job_env(tmp_path, HF_TOKEN=INVALID, HF_ENDPOINT=hub.url))

    assert done.returncode == 1
    assert time.monotonic() - t0 < 15
    assert "HF token was rejected" in done.stderr
    assert "Traceback" not in done.stderr


def test_dry_run_job_needs_no_token_and_no_reachable_hub(tmp_path):
    config = make_config(tmp_path)
    run = make_run(config)
    env = job_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")

    done = run_job(tmp_path, config, "--dry-run", env=env)

    assert done.returncode == 0, done.stderr
    assert (run.root / "push-dry-run" / PLAN_FILE).is_file() and (run.root / "push-dry-run" / "README.md").is_file()
    assert not run.is_complete("push")


def test_dry_run_is_skipped_when_unchanged_and_redone_without_force_when_the_config_changed(tmp_path, no_network):
    config = make_config(tmp_path)
    run = make_run(config)
    assert push_stage(config, None, dry_run=True) == 0
    first = (run.root / "push-dry-run" / "manifest.json").read_bytes()
    assert push_stage(config, None, dry_run=True) == 0
    assert (run.root / "push-dry-run" / "manifest.json").read_bytes() == first
    private = config.model_copy(update={"push": config.push.model_copy(update={"private": False})})
    assert push_stage(private, None, dry_run=True) == 0
    assert json.loads((run.root / "push-dry-run" / PLAN_FILE).read_text())["private"] is False
