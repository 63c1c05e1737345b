"""Preflight for a cloud GPU VM, before an hour of it is paid for: `make doctor`.

    python -m medcot.doctor --config configs/deepseek-r1-distill-llama-8b-medical.yaml [KEY=VALUE ...]

Checks the NVIDIA driver against the image's CUDA version, Docker, Compose and the engine's version, the NVIDIA
Container Toolkit, GPU memory and free disk against what the config needs, the tokens, and, once the image is
built, that it compiles a Triton kernel on this GPU. Memory and disk needs are estimates from the model's parameter
count, not measurements. Every failure prints its fix; the exit status is 1 when any check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dotenv import dotenv_values

from medcot.config import ConfigError, RunConfig, load_config
from medcot.secrets import get_secret

# Oldest Linux driver for each CUDA version (NVIDIA's CUDA release notes, "CUDA Toolkit and Corresponding Driver
# Versions", GA releases). The image's CUDA version is docker/Dockerfile's CUDA_VERSION.
DRIVER_FOR_CUDA = {
    "12.4": "550.54.14",
    "12.6": "560.28.03",
    "12.8": "570.26",
    "12.9": "575.51.03",
    "13.0": "580.65.06",
}
# The image's CUDA version: docker/Dockerfile's CUDA_VERSION, which matches the locked torch's CUDA libraries.
DEFAULT_IMAGE_CUDA = "13.0.2"
# Environment-sourced compose secrets readable by a non-root user (uid/gid honoured) arrived in Compose 2.20, the
# `!reset` tag of compose.cpu.yaml (make up CPU=1) in 2.24.
COMPOSE_MIN = (2, 24)
# Engines before 23.0 resolve the user of a container that compose copies its secrets into by looking it up in
# the host's user database, not the image's (seen with Debian 12's docker.io, Engine 20.10.24): the image's
# `USER 1000` then starts only where the host has a user with uid 1000.
ENGINE_LOOKS_UP_USER_ON_HOST_BEFORE = (23, 0)
IMAGE_UID = 1000

# Parameter counts (billions) of models whose names do not say it or say it loosely.
KNOWN_PARAMS_B = {
    "unsloth/deepseek-r1-distill-llama-8b": 8.03,
    "unsloth/deepseek-r1-distill-llama-8b-unsloth-bnb-4bit": 8.03,
    "deepseek-ai/deepseek-r1-distill-llama-8b": 8.03,
    "embedded:smollm2-135m-instruct": 0.135,
}
# GB per billion parameters. A 4-bit (NF4) base costs 0.5 byte a weight plus quantization constants and the
# 16-bit embeddings; its pre-quantized download is larger for the same reason (unsloth's 8B: ~6 GB).
GPU_GB_PER_B = {"4bit": 0.55, "16bit": 2.0, "32bit": 4.0}
DOWNLOAD_4BIT_GB_PER_B = 0.75
# LoRA weights, gradients and Adam states in fp32 (16 bytes a parameter); rank 16 on all seven Llama projections
# adds about 0.52% of the base's parameters.
LORA_GB_PER_B_AT_R16 = 0.084
# Activations per billion parameters, per row of a micro-batch and per 1024 tokens of max_seq_length. With
# checkpointing: from the same 8B model's peaks with Unsloth's offloaded checkpointing on an H100 (BENCHMARKS.md),
# 6.8 GiB at 2 x 2048 and 9.9 GiB at 8 x 2048 (8.8 padding-free): 0.51 GiB a row of 2,048 tokens above the weights,
# LoRA states and CUDA context counted here; the recipe's 8 x 1 comes to ~10.6 GB. Without: from its 20.8 GiB peak
# at 2 x 2048, less its ~5.7 GiB of weights and optimizer state. `auto` is sized as checkpointed, the least it
# needs: the train job turns checkpointing off only where the GPU has room.
ACTIVATION_GB_PER_B = 0.035
ACTIVATION_GB_PER_B_NO_CHECKPOINTING = 0.5
CUDA_CONTEXT_GB = 1.0
CHECKPOINTS_GB = 1.0

Status = Literal["ok", "warn", "fail", "skip"]


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    driver: str
    memory_total_mib: int | None
    memory_free_mib: int | None


@dataclass
class Needs:
    """What a config needs, in GB (10^9 bytes), each total with its parts for the message."""

    params_b: float
    params_source: str
    gpu: dict[str, float] = field(default_factory=dict)
    hf_cache: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def total(parts: dict[str, float]) -> float:
        return sum(parts.values())


# -- parsing --------------------------------------------------------------------------------------------------

NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total,memory.free",
                    "--format=csv,noheader,nounits"]


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """GPUs from the output of NVIDIA_SMI_QUERY; memory is None where nvidia-smi prints [N/A] (vGPU, MIG)."""

    def mib(value: str) -> int | None:
        return int(value) if value.strip().isdigit() else None

    gpus = []
    for row in csv.reader(text.strip().splitlines(), skipinitialspace=True):
        if len(row) != 5:
            raise ValueError(f"unexpected nvidia-smi line: {', '.join(row)!r}")
        index, name, driver, total, free = (cell.strip() for cell in row)
        gpus.append(Gpu(int(index), name, driver, mib(total), mib(free)))
    return gpus


def version_tuple(text: str) -> tuple[int, ...]:
    """'570.124.06' -> (570, 124, 6); 'v2.40.3' -> (2, 40, 3)."""
    return tuple(int(part) for part in re.findall(r"\d+", text))


def cuda_minor(cuda: str) -> str:
    """'12.8.1' -> '12.8'."""
    return ".".join(cuda.split(".")[:2])


def params_from_hf_config(cfg: dict) -> int:
    """Parameter count of a Llama-shaped decoder (Llama, Mistral, Qwen, SmolLM) from its config.json."""
    hidden, layers, vocab = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or hidden // heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim  # q, o; k, v
    mlp = 3 * hidden * cfg["intermediate_size"]  # gate, up, down
    per_layer = attention + mlp + 2 * hidden  # two RMSNorms
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings") else 2)  # input, lm_head
    return embeddings + layers * per_layer + hidden


def model_params_b(name: str) -> tuple[float, str] | None:
    """Parameter count in billions, and where it came from: a local model's config.json, the table, the name."""
    local = Path(name) / "config.json"
    if local.is_file():
        try:
            return params_from_hf_config(json.loads(local.read_text(encoding="utf-8"))) / 1e9, str(local)
        except (KeyError, TypeError, ValueError):
            pass  # not Llama-shaped: fall back to the name
    key = name.lower()
    if key in KNOWN_PARAMS_B:
        return KNOWN_PARAMS_B[key], "known size"
    # '...-8B-Instruct' -> 8, 'SmolLM2-135M' -> 0.135; '4bit' is not a size, hence the letter that may not follow.
    sizes = re.findall(r"(\d+(?:\.\d+)?)([bBmM])(?![a-zA-Z])", Path(name).name)
    if sizes:
        number, unit = sizes[-1]
        return float(number) / (1000 if unit in "mM" else 1), "the model's name"
    return None


def estimate_needs(config: RunConfig) -> Needs | None:
    """GPU memory and disk a run of `config` needs, or None when the model's size cannot be told."""
    found = model_params_b(config.model.name)
    if found is None:
        return None
    params_b, source = found
    needs = Needs(params_b, source)
    four_bit = config.model.load_in_4bit
    if four_bit:
        needs.gpu["4-bit weights"] = params_b * GPU_GB_PER_B["4bit"]
    else:
        needs.gpu["16-bit weights"] = params_b * GPU_GB_PER_B["32bit" if config.model.dtype == "float32" else "16bit"]
    lora_share = (config.lora.r / 16) * (len(config.lora.target_modules) / 7)
    needs.gpu["LoRA + optimizer"] = params_b * LORA_GB_PER_B_AT_R16 * lora_share
    rows = config.training.per_device_train_batch_size
    per_b = ACTIVATION_GB_PER_B if config.lora.use_gradient_checkpointing is not False else ACTIVATION_GB_PER_B_NO_CHECKPOINTING
    needs.gpu["activations"] = params_b * per_b * rows * config.model.max_seq_length / 1024
    needs.gpu["CUDA context"] = CUDA_CONTEXT_GB

    sixteen_bit_gb = params_b * 2
    if config.model.name.startswith("embedded:"):
        pass  # ships inside the image
    elif four_bit:
        needs.hf_cache["4-bit download"] = params_b * DOWNLOAD_4BIT_GB_PER_B
        # Merging into 16-bit weights reads the 16-bit base: counted so that the last stage cannot run out of disk.
        needs.hf_cache["16-bit base for the merge"] = sixteen_bit_gb
    else:
        needs.hf_cache["16-bit download"] = sixteen_bit_gb
    needs.outputs["merged 16-bit model"] = sixteen_bit_gb
    needs.outputs["checkpoints and adapters"] = CHECKPOINTS_GB
    return needs


def _parts(parts: dict[str, float]) -> str:
    return " + ".join(f"{name} {gb:.1f}" for name, gb in parts.items())


# -- checks: each takes what a tool printed (None where the tool is missing) and returns a Check ----------------

def check_driver(smi_output: str | None, smi_error: str, cuda: str) -> Check:
    name = "NVIDIA driver"
    minimum = DRIVER_FOR_CUDA.get(cuda_minor(cuda))
    if minimum is None:
        return Check(name, "fail", f"unknown image CUDA version {cuda}",
                     f"pass --cuda as one of {', '.join(DRIVER_FOR_CUDA)} (docker/Dockerfile's CUDA_VERSION)")
    if smi_output is None:
        if smi_error:
            return Check(name, "fail", f"nvidia-smi failed: {smi_error}",
                         "the driver is installed but not loaded: reboot (needed after a driver install or a "
                         "kernel update), then run `nvidia-smi` again")
        return Check(name, "fail", "nvidia-smi not found: no NVIDIA driver on this machine",
                     f"install the NVIDIA driver, version {minimum} or newer (Ubuntu: `sudo ubuntu-drivers install "
                     "--gpgpu`, then reboot), or start the VM from the cloud's GPU image, which has it")
    gpus = parse_nvidia_smi(smi_output)
    if not gpus:
        return Check(name, "fail", "nvidia-smi lists no GPU", "check that the VM has a GPU attached (its machine type)")
    driver = gpus[0].driver
    names = ", ".join(sorted({g.name for g in gpus}))
    image_cuda = f"the image's CUDA {cuda_minor(cuda)}"
    if version_tuple(driver) >= version_tuple(minimum):
        return Check(name, "ok", f"{driver} on {len(gpus)} GPU(s) ({names}); {image_cuda} needs >= {minimum}")
    return Check(name, "fail", f"{driver} is older than the {minimum} that {image_cuda} needs",
                 f"upgrade the driver to {minimum} or newer (Ubuntu: `sudo ubuntu-drivers install --gpgpu`, then "
                 "reboot), or start the VM from the cloud's current GPU image")


def check_docker(compose_version: str | None, info_error: str | None) -> Check:
    """`compose_version`: what `docker compose version --short` printed (None: missing); `info_error`: why `docker
    info` failed (None: docker itself is missing; "" : it answered)."""
    name = "Docker + Compose"
    if info_error is None:
        return Check(name, "fail", "docker not found",
                     "install Docker Engine with its compose plugin: https://docs.docker.com/engine/install/")
    if info_error:
        fix = "start it: `sudo systemctl start docker`"
        if "permission denied" in info_error.lower():
            fix = "add yourself to the docker group: `sudo usermod -aG docker $USER`, then log out and in again"
        return Check(name, "fail", f"cannot reach the Docker daemon: {info_error.splitlines()[0]}", fix)
    if compose_version is None:
        return Check(name, "fail", "`docker compose` (Compose v2) not found",
                     "install the compose plugin: `sudo apt-get install docker-compose-plugin` (Docker's apt "
                     "repository); the old `docker-compose` v1 cannot read compose.yaml")
    if version_tuple(compose_version)[:2] < COMPOSE_MIN:
        return Check(name, "fail", f"Compose {compose_version.strip()} is older than {'.'.join(map(str, COMPOSE_MIN))}",
                     "upgrade the compose plugin: `sudo apt-get install --only-upgrade docker-compose-plugin`")
    return Check(name, "ok", f"daemon reachable, Compose {compose_version.strip()}")


def check_engine(server_version: str | None, host_has_image_uid: bool) -> Check:
    """`server_version`: what `docker version --format '{{.Server.Version}}'` printed (None: no daemon answered);
    `host_has_image_uid`: whether this host's user database has uid 1000 (`getent passwd 1000`)."""
    name = "Docker Engine"
    if server_version is None:
        return Check(name, "skip", "no daemon answered (see Docker + Compose)")
    version = server_version.strip()
    if version_tuple(version)[:2] >= ENGINE_LOOKS_UP_USER_ON_HOST_BEFORE:
        return Check(name, "ok", version)
    if host_has_image_uid:
        return Check(name, "ok", f"{version}: before 23.0 it looks the jobs' user (uid {IMAGE_UID}) up on the host, "
                                 "which has one")
    return Check(name, "fail", f"{version}: before 23.0 the engine looks the jobs' user (uid {IMAGE_UID}) up on the "
                               "host when it hands them their secrets, and this host has no such user",
                 "upgrade Docker Engine to 23.0 or newer (https://docs.docker.com/engine/install/), or add a user "
                 f"with that uid: `sudo useradd --uid {IMAGE_UID} --no-create-home --shell /usr/sbin/nologin medcot`")


def check_container_toolkit(tools_found: list[str], docker_runtimes: str | None) -> Check:
    """`tools_found`: toolkit programs on PATH; `docker_runtimes`: `docker info --format '{{json .Runtimes}}'`."""
    name = "NVIDIA Container Toolkit"
    if tools_found or (docker_runtimes and "nvidia" in docker_runtimes):
        via = ", ".join(tools_found) if tools_found else "Docker's nvidia runtime"
        return Check(name, "ok", f"found ({via})")
    return Check(name, "fail", "not installed: containers cannot reach the GPU",
                 "install it and register it with Docker: https://docs.nvidia.com/datacenter/cloud-native/"
                 "container-toolkit/latest/install-guide.html (`sudo apt-get install -y nvidia-container-toolkit && "
                 "sudo nvidia-ctk runtime configure --runtime=docker && sudo systemctl restart docker`)")


def check_gpu_memory(smi_output: str | None, needs: Needs | None) -> Check:
    name = "GPU memory"
    if needs is None:
        return Check(name, "warn", "cannot estimate: the model's size is unknown (not in the table, name or config.json)")
    need = Needs.total(needs.gpu)
    estimate = f"~{need:.1f} GB estimated for {needs.params_b:.2f}B parameters ({_parts(needs.gpu)})"
    if smi_output is None:
        return Check(name, "skip", f"{estimate}; no GPU to compare with (see the driver check)")
    gpus = parse_nvidia_smi(smi_output)
    # One-GPU jobs run on the first GPU the reservation hands the container: the host's GPU 0 by default.
    gpu = gpus[0]
    if gpu.memory_total_mib is None:
        return Check(name, "warn", f"{estimate}; nvidia-smi does not report GPU {gpu.index}'s memory")
    total, free = gpu.memory_total_mib * 2**20 / 1e9, (gpu.memory_free_mib or 0) * 2**20 / 1e9
    if total < need:
        return Check(name, "fail", f"{estimate}; GPU {gpu.index} ({gpu.name}) has {total:.1f} GB",
                     "use a larger GPU, or lower the need: model.max_seq_length, "
                     "training.per_device_train_batch_size (raise gradient_accumulation_steps to keep the batch), "
                     "model.load_in_4bit=true")
    if free < need:
        return Check(name, "warn", f"{estimate}; GPU {gpu.index} has {total:.1f} GB but only {free:.1f} GB free",
                     "stop what else uses the GPU (`nvidia-smi` lists the processes)")
    return Check(name, "ok", f"{estimate}; GPU {gpu.index} has {total:.1f} GB ({free:.1f} GB free)")


def check_disk(needs: list[tuple[str, Path, float]]) -> Check:
    """`needs`: (what, folder, GB). Folders on one filesystem draw on the same free space; a folder that does not
    exist yet is judged by the nearest folder above it that does."""
    name = "Disk"
    by_fs: dict[int, tuple[Path, float, list[tuple[str, float]]]] = {}
    for what, folder, gb in needs:
        existing = folder.absolute()
        while not existing.exists():
            existing = existing.parent
        stats = os.statvfs(existing)
        device = os.stat(existing).st_dev
        _, free, items = by_fs.setdefault(device, (existing, stats.f_bavail * stats.f_frsize / 1e9, []))
        items.append((what, gb))
    short, lines = [], []
    for where, free, items in by_fs.values():
        need = sum(gb for _, gb in items)
        line = f"{where}: {need:.1f} GB needed ({_parts(dict(items))}), {free:.1f} GB free"
        lines.append(line)
        if need > free:
            short.append(line)
    if short:
        return Check(name, "fail", "; ".join(short),
                     "free space or grow the disk. Docker keeps named volumes under its data root "
                     "(`docker info -f '{{.DockerRootDir}}'`); to use a bigger disk, set \"data-root\" in "
                     "/etc/docker/daemon.json and restart Docker")
    return Check(name, "ok", "; ".join(lines) + " (estimates)")


def check_tokens(dotenv_path: Path) -> list[Check]:
    """HF_TOKEN is required, WANDB_API_KEY optional. Compose passes both as secrets from the environment or `.env`
    beside compose.yaml, and refuses to start when either variable is undefined, even one that may be empty."""
    dotenv = dotenv_values(dotenv_path) if dotenv_path.is_file() else {}

    def visible_to_compose(name: str) -> bool:
        return name in os.environ or name in dotenv

    checks = []
    if not get_secret("HF_TOKEN", dotenv_path):
        checks.append(Check("HF_TOKEN", "fail", "not found",
                            f"create a token at https://huggingface.co/settings/tokens (write access, to push) and "
                            f"put `HF_TOKEN=hf_...` in {dotenv_path}"))
    elif not visible_to_compose("HF_TOKEN"):
        checks.append(Check("HF_TOKEN", "fail", "found only in a file, which compose does not read",
                            f"put `HF_TOKEN=...` in {dotenv_path} or export it"))
    else:
        checks.append(Check("HF_TOKEN", "ok", "found (its value is not shown)"))

    if get_secret("WANDB_API_KEY", dotenv_path) and visible_to_compose("WANDB_API_KEY"):
        checks.append(Check("WANDB_API_KEY", "ok", "found: runs log to W&B online"))
    elif visible_to_compose("WANDB_API_KEY"):
        checks.append(Check("WANDB_API_KEY", "ok", "empty: W&B logs offline into the run directory"))
    else:
        checks.append(Check("WANDB_API_KEY", "fail", "undefined, and compose refuses to start without it",
                            f"add `WANDB_API_KEY=` to {dotenv_path} (empty: W&B logs offline), or your key from "
                            "https://wandb.ai/authorize"))
    return checks


def check_image_triton(image: str, docker_ready: bool) -> Check:
    """Run docker/check_triton.py (the image's default command) in the image, on a GPU."""
    name = "Triton in the image"
    if not docker_ready:
        return Check(name, "skip", "needs the driver, Docker and the Container Toolkit (see above)")
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
        return Check(name, "skip", f"{image} is not built yet: `make image`, then `make doctor` again")
    try:
        proc = subprocess.run(["docker", "run", "--rm", "--gpus", "all", image],
                              capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return Check(name, "fail", "no answer in 10 minutes", "run `docker run --rm --gpus all " + image + "` to watch it")
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode == 0:
        return Check(name, "ok", output.splitlines()[-1])
    return Check(name, "fail", output[-600:] or f"exit status {proc.returncode}",
                 "fix what the message names, then `make image` if the image itself lacks something")


# -- gathering and reporting ----------------------------------------------------------------------------------

def _run(cmd: list[str], timeout: float = 60) -> tuple[str | None, str]:
    """(stdout, "") when the command succeeded; (None, why) when it failed; (None, "") when it is not installed."""
    if shutil.which(cmd[0]) is None:
        return None, ""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"no answer from `{' '.join(cmd)}` in {timeout:.0f} s"
    if proc.returncode != 0:
        return None, (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
    return proc.stdout, ""


def run_checks(config: RunConfig, cuda: str, env_file: Path, image: str | None,
               hf_cache: Path | None, outputs: Path | None) -> list[Check]:
    smi, smi_error = _run(NVIDIA_SMI_QUERY)
    checks = [check_driver(smi, smi_error, cuda)]

    info, info_error = _run(["docker", "info", "--format", "{{json .Runtimes}}"])
    docker_root = None
    if shutil.which("docker") is None:
        checks.append(check_docker(None, None))
    else:
        compose, _ = _run(["docker", "compose", "version", "--short"])
        checks.append(check_docker(compose, info_error))
        server, _ = _run(["docker", "version", "--format", "{{.Server.Version}}"])
        host_uid, _ = _run(["getent", "passwd", str(IMAGE_UID)])
        checks.append(check_engine(server, bool(host_uid)))
        root, _ = _run(["docker", "info", "--format", "{{.DockerRootDir}}"])
        docker_root = Path(root.strip()) if root and root.strip() else None
    tools = [t for t in ("nvidia-ctk", "nvidia-container-runtime-hook", "nvidia-container-toolkit") if shutil.which(t)]
    checks.append(check_container_toolkit(tools, info))

    needs = estimate_needs(config)
    checks.append(check_gpu_memory(smi, needs))
    if needs is None:
        checks.append(Check("Disk", "warn", "cannot estimate: the model's size is unknown"))
    else:
        # The compose volumes live under Docker's data root; without Docker, where the jobs would write.
        cache_dir = hf_cache or docker_root or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
        outputs_dir = outputs or docker_root or Path(config.output_dir)
        checks.append(check_disk([(what, cache_dir, gb) for what, gb in needs.hf_cache.items()]
                                 + [(what, outputs_dir, gb) for what, gb in needs.outputs.items()]))
    checks.extend(check_tokens(env_file))
    if image:
        ready = all(c.status == "ok" for c in checks if c.name in ("NVIDIA driver", "Docker + Compose",
                                                                      "NVIDIA Container Toolkit"))
        checks.append(check_image_triton(image, ready))
    return checks


def report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"  {c.status.upper():5} {c.name:{width}}  {c.detail}")
        if c.fix:
            lines.append(f"  {'':5} {'':{width}}  fix: {c.fix}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medcot.doctor", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (default: the reference recipe)")
    # Not read from the environment: CUDA environments export a CUDA_VERSION of their own.
    parser.add_argument("--cuda", default=DEFAULT_IMAGE_CUDA,
                        help="the image's CUDA version (default %(default)s, docker/Dockerfile's)")
    parser.add_argument("--env-file", type=Path, default=Path(".env"), help="where compose reads the tokens")
    parser.add_argument("--image", default="medcot:latest", help="image to run the Triton check in")
    parser.add_argument("--no-image", action="store_true", help="skip the Triton check in the image")
    parser.add_argument("--hf-cache", type=Path, help="folder of the HF cache (default: Docker's data root)")
    parser.add_argument("--outputs", type=Path, help="folder of the run directories (default: Docker's data root)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"medcot doctor: {args.config or 'default config'}, model {config.model.name}, image CUDA {args.cuda}")
    checks = run_checks(config, args.cuda, args.env_file, None if args.no_image else args.image,
                        args.hf_cache, args.outputs)
    print(report(checks))
    failed = [c.name for c in checks if c.status == "fail"]
    print(f"\n{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "\nall checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
