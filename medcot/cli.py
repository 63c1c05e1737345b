"""What every job shares: argument parsing, logging with secret redaction, and clean exits on user errors.

    python jobs/<job>.py --config configs/demo.yaml [--run-name NAME] [--force] [KEY=VALUE ...]
    python jobs/<job>.py --config FILE --help      # every key with the value FILE gives it
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping

from medcot.config import ConfigError, RunConfig, describe, load_config
from medcot.durable import DurableError
from medcot.secrets import RedactingFilter, load_secrets_into_env, redact

log = logging.getLogger("medcot")

# Errors a user can cause and fix; anything else is our bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DurableError)


def register_user_error(*types: type[BaseException]) -> None:
    global USER_ERRORS
    USER_ERRORS = USER_ERRORS + types


def setup_logging(level: int = logging.INFO) -> None:
    import os

    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 speaks for all
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "fsspec", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns on every CPU import about optional kernels we do not use there.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def build_parser(job: str, doc: str | None, extra: Callable[[argparse.ArgumentParser], None] | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"jobs/{job}.py", description=doc, add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="KEY=VALUE overrides any config key, e.g. training.max_steps=30 lora.r=8",
    )
    parser.add_argument("--config", help="YAML run config (configs/*.yaml); defaults are the reference recipe")
    parser.add_argument("--run-name", help="override run_name (the run directory under output_dir)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument("--force", action="store_true", help="redo a finished stage whose config or inputs changed")
    parser.add_argument("-h", "--help", action="store_true", help="show this help and every config key with its value")
    if extra:
        extra(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    return parser


def parse_job_args(job: str, doc: str | None = None, argv: list[str] | None = None,
                   extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[RunConfig, argparse.Namespace]:
    parser = build_parser(job, doc, extra)
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.run_name:
        overrides.append(f"run_name={args.run_name}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        if args.help:
            parser.print_help()
        print(f"error: {redact(str(e))}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.help:
        parser.print_help()
        print(f"\nconfig keys (values from {args.config or 'defaults'}):")
        print(describe(config))
        raise SystemExit(0)
    return config, args


# Static rendezvous: the head node runs evaluate-before first, so the others may wait that long for it (torchrun's
# default is 600 s).
RENDEZVOUS_TIMEOUT_S = 1800
DEFAULT_MASTER_PORT = 29500


def _count(env: Mapping[str, str], names: tuple[str, ...], what: str) -> int:
    name = next((n for n in names if env.get(n)), None)
    if name is None:
        return 1
    raw = env[name]
    try:
        n = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of {what}; set {name}=1, 2, ... or leave it unset") from None
    if n < 1:
        raise ConfigError(f"{name}={n}: at least one {what[:-1]} is needed")
    return n


def data_parallel_argv(script: str, argv: list[str], env: Mapping[str, str]) -> list[str] | None:
    """The command that restarts `script` under torchrun, one process per GPU, when this process is not already one
    of torchrun's workers and more than one process is asked for; None when it should run as it is.

    GPUS (or NPROC; on SkyPilot, SKYPILOT_NUM_GPUS_PER_NODE) is the number of processes on this machine. Across
    machines, the rendezvous comes from SkyPilot's variables (SKYPILOT_NUM_NODES, SKYPILOT_NODE_RANK, the first of
    SKYPILOT_NODE_IPS as the master, MASTER_PORT or 29500) or, where PET_NNODES is set, from torchrun's own PET_*
    variables, which torchrun reads itself. This is how `docker compose` (GPUS=N) and a SkyPilot task with
    `num_nodes: N` get data-parallel training without a launcher of their own.
    """
    if "LOCAL_RANK" in env:
        return None
    gpus = _count(env, ("GPUS", "NPROC", "SKYPILOT_NUM_GPUS_PER_NODE"), "GPUs")
    nodes = _count(env, ("SKYPILOT_NUM_NODES",), "nodes")
    launch = [sys.executable, "-m", "torch.distributed.run"]
    if nodes > 1:
        ips = env.get("SKYPILOT_NODE_IPS", "").split()
        rank = env.get("SKYPILOT_NODE_RANK", "")
        if len(ips) != nodes or not rank.isdigit() or int(rank) >= nodes:
            raise ConfigError(
                f"SKYPILOT_NUM_NODES={nodes} needs SKYPILOT_NODE_IPS to list {nodes} addresses (found {len(ips)}) and "
                f"SKYPILOT_NODE_RANK to be 0..{nodes - 1} (found {rank!r}); SkyPilot sets both on every node"
            )
        port = _count(env, ("MASTER_PORT",), "ports") if env.get("MASTER_PORT") else DEFAULT_MASTER_PORT
        launch += [f"--nnodes={nodes}", f"--node_rank={rank}", f"--master_addr={ips[0]}", f"--master_port={port}",
                   f"--rdzv_conf=timeout={RENDEZVOUS_TIMEOUT_S}"]
    elif env.get("PET_NNODES"):
        pass  # torchrun takes --nnodes, --node_rank, --master_addr... from PET_* itself
    elif gpus == 1:
        return None
    else:
        launch.append("--standalone")
    return [*launch, f"--nproc_per_node={gpus}", script, *argv]


def run_job(main: Callable[[], int | None]) -> None:
    """Run a job's main(); user errors print one clear message (secrets masked) and exit 1."""
    setup_logging()
    load_secrets_into_env()
    try:
        code = main()
    except USER_ERRORS as e:
        log.error("%s", redact(str(e)))
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        log.error("interrupted")
        raise SystemExit(130) from None
    except Exception:
        # A bug (ours or a library's): the traceback is kept, but printed through the log, which masks
        # secrets in it; Python's own printing of an uncaught exception would not.
        log.exception("unexpected error (a bug: please report it with this traceback)")
        raise SystemExit(1) from None
    raise SystemExit(code or 0)
