"""The image and the compose chain for real: `make image` builds docker/Dockerfile from the lock, and `make up CPU=1`
runs the demo config, shrunk, through every job in containers on a Docker engine, as a user on a GPU VM runs it
(without the GPU reservation).

    make test-containers        # needs a running engine and the image's base: bash .ci/container-engine.sh

Marked `container` and left out of `make test`: the build downloads about 5 GB of wheels. The tests share one
compose project (`medcot-test`, its own volumes), run in file order and remove it at the end.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import subprocess
import time
from pathlib import Path

import pytest
from reliability import adapter_tensors, assert_same_tensors

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "medcot-test"
VOLUME = f"{PROJECT}_outputs"
IMAGE = "medcot:latest"
CANARY = "hf_containercanary" + secrets.token_hex(8)
STAGE_JOBS = ("evaluate-before", "train", "merge", "evaluate-after", "push-dry-run")
TRAIN_STEPS = 6
# configs/demo.yaml shrunk to seconds a job; the same training settings in every run, so their adapters compare.
SHRINK = (f"data.train_rows=16 data.heldout_rows=2 eval.heldout_limit=2 eval.max_new_tokens=8 eval.batch_size=2 "
          f"eval.mcq=[] eval.showcase_questions=[] training.max_steps={TRAIN_STEPS} "
          "training.per_device_train_batch_size=2 training.warmup_steps=0 training.logging_steps=1 "
          "training.save_steps=100")
TIMES: dict[str, float] = {}

pytestmark = pytest.mark.container


def docker(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """What `make up` runs with: the canary as HF_TOKEN, W&B offline, this project's name, no developer .env."""
    try:
        docker("info", timeout=30)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"no Docker engine answers ({e}); start one and make the base: bash .ci/container-engine.sh")
    empty = tmp_path_factory.mktemp("compose") / "empty.env"
    empty.touch()
    return {**os.environ, "HF_TOKEN": CANARY, "WANDB_API_KEY": "",
            "COMPOSE": f"docker compose -p {PROJECT} --env-file {empty}"}


def compose(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*env["COMPOSE"].split(), "-f", "compose.yaml", "-f", "compose.cpu.yaml", *args],
                          capture_output=True, text=True, check=check, cwd=ROOT, env=env)


def make_up(env: dict[str, str], run: str, extra: str = "", label: str = "") -> subprocess.CompletedProcess:
    t0 = time.monotonic()
    proc = subprocess.run(["make", "up", "CPU=1", "CONFIG=configs/demo.yaml", f"RUN_NAME={run}", f"ARGS={SHRINK} {extra}"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    TIMES[label or f"make up ({run})"] = time.monotonic() - t0
    return proc


def now() -> str:
    """A timestamp for `docker compose logs --since`: a service's container, and its log, outlive one `make up`."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def states(env: dict[str, str]) -> dict[str, tuple[str, str]]:
    out = compose(env, "ps", "--all", "--format", "{{.Service}} {{.State}} {{.ExitCode}}").stdout
    return {service: (state, code) for service, state, code in (line.split() for line in out.splitlines())}


def in_volume(script: str) -> str:
    """Run `script` in a container of the image with the outputs volume mounted, as the image's user."""
    return docker("run", "--rm", "-v", f"{VOLUME}:/data/outputs", IMAGE, "bash", "-c", script).stdout


@pytest.fixture(scope="module")
def image(env):
    t0 = time.monotonic()
    build = subprocess.run(["make", "image", "CPU=1"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    TIMES["make image"] = time.monotonic() - t0
    yield json.loads(docker("image", "inspect", IMAGE).stdout)[0]
    compose(env, "--profile", "push", "down", "--volumes", check=False)
    print("\ncontainer test times:\n" + "\n".join(f"  {k:<32} {v:7.1f} s" for k, v in TIMES.items()))


@pytest.fixture(scope="module")
def chain(env, image):
    return make_up(env, "ci")


def test_image_is_built_from_the_lock_and_runs_as_uid_1000(image):
    assert image["Config"]["User"] == "1000"
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE).stdout
    assert re.search(r"--require-hashes [-\w ]*-r /tmp/requirements\.lock", history), history
    print(f"\nimage {IMAGE}: {image['Size'] / 1e9:.2f} GB")


def test_every_job_of_the_chain_exits_0(env, chain):
    assert chain.returncode == 0, chain.stdout[-4000:] + chain.stderr[-2000:]
    assert states(env) == {job: ("exited", "0") for job in (*STAGE_JOBS, "report")}
    assert "medcot chain: every job finished." in chain.stdout


def test_report_and_merged_model_are_in_the_volume_owned_by_uid_1000_and_load(env, chain):
    found = in_volume("cd /data/outputs/ci && ls report/report.html merge/model/model.safetensors "
                      "&& find . ! -uid 1000 | head -5")
    assert found.split() == ["merge/model/model.safetensors", "report/report.html"]  # and nothing owned by another uid
    loaded = in_volume("python -c \"from transformers import AutoModelForCausalLM as M; "
                       "m = M.from_pretrained('/data/outputs/ci/merge/model'); print(type(m).__name__, m.dtype)\"")
    assert loaded.split() == ["LlamaForCausalLM", "torch.float16"]


def test_a_second_make_up_skips_every_finished_stage(env, chain):
    since = now()
    again = make_up(env, "ci", label="make up again (ci)")
    assert again.returncode == 0, again.stdout[-4000:]
    for job in STAGE_JOBS:
        logs = compose(env, "logs", "--since", since, job).stdout
        assert "nothing to do" in logs, (job, logs[-1500:])
        assert "loaded in" not in logs  # no model was loaded to find that out


def test_sigterm_mid_training_leaves_a_checkpoint_and_the_next_make_up_resumes_to_the_same_adapter(env, chain,
                                                                                                  tmp_path):
    t0, since = time.monotonic(), now()
    up = subprocess.Popen(["make", "up", "CPU=1", "CONFIG=configs/demo.yaml", "RUN_NAME=ci-stop", f"ARGS={SHRINK}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    deadline = time.monotonic() + 900
    while f"step 2/{TRAIN_STEPS}" not in compose(env, "logs", "--since", since, "train", check=False).stdout:
        assert up.poll() is None and time.monotonic() < deadline, "the train job never logged step 2"
        time.sleep(0.5)
    compose(env, "kill", "--signal", "SIGTERM", "train")
    stopped_output, _ = up.communicate(timeout=600)
    TIMES["make up, stopped by SIGTERM (ci-stop)"] = time.monotonic() - t0
    assert up.returncode != 0, stopped_output[-3000:]
    assert re.search(r"train\s+stopped by a signal \(exit 143\)", stopped_output), stopped_output[-3000:]
    checkpoints = in_volume("cd /data/outputs/ci-stop/checkpoints && ls */medcot-complete").split()
    assert checkpoints, "no complete checkpoint after SIGTERM"
    step = int(re.match(r"checkpoint-(\d+)/", checkpoints[-1]).group(1))
    assert 2 <= step < TRAIN_STEPS

    since = now()
    resumed = make_up(env, "ci-stop", label="make up, resumed (ci-stop)")
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    logs = compose(env, "logs", "--since", since, "train").stdout
    assert f"resuming from /data/outputs/ci-stop/checkpoints/checkpoint-{step}" in logs
    for run in ("ci", "ci-stop"):
        compose(env, "cp", f"train:/data/outputs/{run}/train/adapter", str(tmp_path / run))
    assert_same_tensors(adapter_tensors(tmp_path / "ci-stop"), adapter_tensors(tmp_path / "ci"))


def test_a_failing_job_makes_make_up_exit_non_zero_and_names_it(env, chain):
    since = now()
    failed = make_up(env, "ci-fail", "lora.target_modules=[nope_proj]")
    assert failed.returncode != 0
    report = failed.stdout[failed.stdout.index("medcot chain:"):]
    assert re.search(r"train\s+FAILED \(exit 1\): docker compose .* logs train", report), report
    for job in ("merge", "evaluate-after", "push-dry-run"):
        assert re.search(rf"{job}\s+never started", report), report
    assert "nope_proj not in" in compose(env, "logs", "--since", since, "train").stdout


def test_the_token_is_in_no_inspect_history_log_or_file_of_the_volume(env, chain):
    containers = compose(env, "ps", "--all", "--quiet").stdout.split()
    assert containers
    places = {
        "docker inspect": docker("inspect", *containers).stdout,
        "docker image inspect": docker("image", "inspect", IMAGE).stdout,
        "docker history": docker("history", "--no-trunc", IMAGE).stdout,
        "logs": compose(env, "logs").stdout,
        "volume files": in_volume(f"grep -rl '{CANARY}' /data/outputs || true"),
    }
    assert [where for where, text in places.items() if CANARY in text] == []


def test_the_jobs_get_the_token_as_a_file_that_only_uid_1000_can_read(env, chain):
    import io
    import tarfile

    container = compose(env, "ps", "--all", "--quiet", "train").stdout.split()[0]
    archive = subprocess.run(["docker", "cp", f"{container}:/run/secrets/hf_token", "-"], capture_output=True,
                             check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        (member,) = tar.getmembers()
        assert (member.uid, member.gid, stat.S_IMODE(member.mode)) == (1000, 1000, 0o400)
        assert tar.extractfile(member).read().decode() == CANARY
    env_of_container = json.loads(docker("inspect", container).stdout)[0]["Config"]["Env"]
    assert not any(CANARY in value for value in env_of_container)
