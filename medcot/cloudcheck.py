"""Before `sky jobs launch` spends money: `make cloud-check`. Runs where you launch from, in SkyPilot's venv.

    python -m medcot.cloudcheck --config CONFIG --bucket s3://my-bucket/medcot [--launch-file F] [--push] [KEY=VALUE ...]

Names what is missing: no cloud enabled in SkyPilot (`sky check`), no bucket or a bucket on a store that no enabled
cloud can reach, no HF_TOKEN, a GPU in the launch file's list with less memory than the config needs (the estimate of
`make doctor`). The token's write access to push.repo_id is `make preflight`'s check, which `make cloud-check PUSH=1`
runs after this one. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from medcot.config import ConfigError, RunConfig, load_config
from medcot.doctor import Check, Needs, estimate_needs, report
from medcot.secrets import get_secret

DEFAULT_LAUNCH_FILE = Path("deploy/skypilot/chain.yaml")
# Memory of each GPU SkyPilot names, in GB (10^9 bytes), from NVIDIA's data sheets: what make doctor's estimate (also
# in GB) is compared with.
GPU_MEMORY_GB = {
    "B200": 180, "H200": 141, "GH200": 96, "H100": 80, "H100-MEGA": 80, "A100-80GB": 80, "A100": 40, "L40S": 48,
    "L40": 48, "A40": 48, "RTXA6000": 48, "RTX6000-Ada": 48, "L4": 24, "A10G": 24, "A10": 24, "V100-32GB": 32,
    "V100": 16, "T4": 16, "P100": 16, "K80": 12,
}
# Where a bucket URL lives, and the SkyPilot cloud whose `storage` capability reaches it.
STORE_CLOUD = {"s3://": "AWS", "gs://": "GCP", "r2://": "Cloudflare", "cos://": "IBM", "oci://": "OCI",
               "nebius://": "Nebius"}


def bucket_cloud(url: str) -> str | None:
    if ".blob.core.windows.net" in url and url.startswith("https://"):
        return "Azure"
    return next((cloud for prefix, cloud in STORE_CLOUD.items() if url.startswith(prefix)), None)


def check_clouds(enabled: dict[str, dict[str, list[str]]] | str) -> Check:
    """`enabled`: what SkyPilot's check returns (workspace -> cloud -> capabilities), or why it failed."""
    name = "SkyPilot clouds"
    fix = "set up a cloud's credentials and run `sky check` (https://docs.skypilot.co: Installation)"
    if isinstance(enabled, str):
        return Check(name, "fail", f"`sky check` failed: {enabled}", fix)
    compute = sorted({c for clouds in enabled.values() for c, caps in clouds.items() if "compute" in caps})
    if not compute:
        return Check(name, "fail", "no cloud is enabled for compute", fix)
    return Check(name, "ok", f"enabled for compute: {', '.join(compute)}")


def check_bucket(url: str | None, enabled: dict[str, dict[str, list[str]]] | str) -> Check:
    name = "Bucket"
    if not url:
        return Check(name, "fail", "no bucket named: the chain's stages and checkpoints would die with the VM",
                     "name one that outlives the VM: BUCKET=s3://my-bucket/medcot (any store SkyPilot mounts: s3://, "
                     "gs://, r2://, https://<account>.blob.core.windows.net/<container>), and pass the same to "
                     "`sky jobs launch --env MEDCOT_BUCKET=...`")
    cloud = bucket_cloud(url)
    if cloud is None:
        return Check(name, "fail", f"{url} is not a bucket URL SkyPilot mounts",
                     "use s3://, gs://, r2://, cos://, oci:// or https://<account>.blob.core.windows.net/<container>")
    if isinstance(enabled, str):
        return Check(name, "skip", f"{url} ({cloud}); cannot tell whether SkyPilot reaches it (see SkyPilot clouds)")
    storage = {c for clouds in enabled.values() for c, caps in clouds.items() if "storage" in caps}
    if cloud not in storage:
        return Check(name, "fail", f"{url} is on {cloud}, which SkyPilot has not enabled for storage",
                     f"set up {cloud}'s credentials and run `sky check {cloud.lower()}`, or use a bucket on one of: "
                     f"{', '.join(sorted(storage)) or 'no store enabled yet'}")
    return Check(name, "ok", f"{url} ({cloud}, enabled for storage)")


def check_token(config: RunConfig, push: bool) -> Check:
    name = "HF_TOKEN"
    if get_secret("HF_TOKEN"):
        what = f"; its write access to {config.push.repo_id} is make preflight's check" if push else ""
        return Check(name, "ok", f"found (its value is not shown), passed as a SkyPilot secret{what}")
    return Check(name, "fail", "not found: the launch files require it (--secret HF_TOKEN takes it from your shell)",
                 "export HF_TOKEN=hf_... (a token with write access to push, from https://huggingface.co/settings/tokens)")


def launch_gpus(launch_file: Path, bucket: str | None) -> dict[str, int]:
    """The GPUs of every resource candidate in `launch_file`, as SkyPilot's parser reads it: name -> count."""
    # SkyPilot lives in its own venv (make cloud-check), not the project's; the checks above take plain values.
    from sky import Task

    config = yaml.safe_load(launch_file.read_text(encoding="utf-8"))
    task = Task.from_yaml_config(config, env_overrides=[("MEDCOT_BUCKET", bucket or "s3://placeholder")])
    return {name: int(count) for r in task.resources for name, count in (r.accelerators or {}).items()}


def check_gpus(gpus: dict[str, int], needs: Needs | None, launch_file: Path) -> Check:
    name = "GPU list"
    if needs is None:
        return Check(name, "warn", "cannot estimate the memory needed: the model's size is unknown")
    need = Needs.total(needs.gpu)
    if not gpus:
        return Check(name, "fail", f"{launch_file} asks for no GPU", "list GPUs under resources.accelerators")
    small = {g: GPU_MEMORY_GB[g] for g in gpus if g in GPU_MEMORY_GB and GPU_MEMORY_GB[g] < need}
    unknown = sorted(g for g in gpus if g not in GPU_MEMORY_GB)
    listed = ", ".join(f"{g} ({GPU_MEMORY_GB[g]} GB)" if g in GPU_MEMORY_GB else g for g in sorted(gpus))
    estimate = f"~{need:.1f} GB estimated to train ({needs.params_b:.2f}B parameters)"
    if small:
        return Check(name, "fail", f"{estimate}; too small: {', '.join(f'{g} ({gb} GB)' for g, gb in small.items())}",
                     f"remove them from resources.accelerators in {launch_file}, or lower the need (model.load_in_4bit"
                     "=true, a smaller training.per_device_train_batch_size with more gradient_accumulation_steps)")
    if unknown:
        return Check(name, "warn", f"{estimate}; memory unknown for {', '.join(unknown)}; the others fit: {listed}")
    return Check(name, "ok", f"{estimate}; each fits: {listed}")


def sky_enabled() -> dict[str, dict[str, list[str]]] | str:
    """What `sky check` enables (workspace -> cloud -> capabilities), through SkyPilot's SDK; or why it failed."""
    from sky.client import sdk  # see launch_gpus

    try:
        return sdk.get(sdk.check(infra_list=None, verbose=False))
    except Exception as error:  # any failure of SkyPilot's check is the finding, with its message
        return f"{type(error).__name__}: {error}"


def run_checks(config: RunConfig, bucket: str | None, launch_file: Path, push: bool,
               enabled: Callable[[], dict[str, Any] | str] = sky_enabled,
               gpus: Callable[[Path, str | None], dict[str, int]] = launch_gpus) -> list[Check]:
    found = enabled()
    return [check_clouds(found), check_bucket(bucket, found), check_token(config, push),
            check_gpus(gpus(launch_file, bucket), estimate_needs(config), launch_file)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medcot.cloudcheck", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (default: the reference recipe)")
    parser.add_argument("--bucket", help="the bucket URL for MEDCOT_BUCKET, e.g. s3://my-bucket/medcot")
    parser.add_argument("--launch-file", type=Path, default=DEFAULT_LAUNCH_FILE, help="default: %(default)s")
    parser.add_argument("--push", action="store_true", help="the chain will push (PUSH=1)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"medcot cloud-check: {args.config or 'default config'}, {args.launch_file}")
    checks = run_checks(config, args.bucket, args.launch_file, args.push)
    print(report(checks))
    failed = [c.name for c in checks if c.status == "fail"]
    print(f"\n{len(failed)} check(s) failed: {', '.join(failed)}" if failed else "\nall checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
