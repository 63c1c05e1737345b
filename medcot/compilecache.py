"""Compiled kernels that outlive a job: Inductor's graphs and autotuning, Triton's kernels and Unsloth's generated
modules, in one folder per GPU model and software version.

Each job of the chain is a new process (a new container): without these caches every one of them compiled the
same kernels again, about 25 s per evaluate job and the train job's first step. The folder sits under
MEDCOT_CACHE (in the containers, the hf-cache volume that every job mounts). Its name holds the GPU's name and
compute capability and the versions of torch, CUDA, Triton, transformers and Unsloth, so that another GPU or an
upgraded image starts a folder of its own instead of reading kernels built for something else.
"""

from __future__ import annotations

import logging
import os
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = ("torch", "triton", "transformers", "unsloth", "unsloth_zoo")
# What each tool reads, and the folder it gets inside the keyed one. A variable the user set is kept.
VARIABLES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton", "UNSLOTH_COMPILE_LOCATION": "unsloth"}


def cache_root(env: dict[str, str] | os._Environ = os.environ) -> Path:
    """MEDCOT_COMPILE_CACHE, else <MEDCOT_CACHE or ~/.cache/medcot>/compile."""
    if env.get("MEDCOT_COMPILE_CACHE"):
        return Path(env["MEDCOT_COMPILE_CACHE"]).expanduser()
    return Path(env.get("MEDCOT_CACHE") or "~/.cache/medcot").expanduser() / "compile"


def cache_key(device_name: str, capability: tuple[int, int], cuda: str | None, versions: dict[str, str | None]) -> str:
    """A folder name that changes with the GPU model and with any version that changes the generated code."""
    parts = [device_name, f"sm{capability[0]}{capability[1]}", f"cuda{cuda or 'none'}"]
    parts += [f"{name}{v}" for name, v in versions.items() if v]
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", "-".join(parts))


def installed_versions() -> dict[str, str | None]:
    def of(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {name: of(name) for name in PACKAGES}


def use_compile_cache(device_name: str, capability: tuple[int, int], cuda: str | None,
                      env: dict[str, str] | os._Environ = os.environ) -> Path:
    """Point Inductor, Triton and Unsloth at this GPU's and versions' folder (before Unsloth is imported: it reads
    its variable then). Returns the folder."""
    folder = cache_root(env) / cache_key(device_name, capability, cuda, installed_versions())
    for variable, sub in VARIABLES.items():
        if not env.get(variable):
            env[variable] = str(folder / sub)
            Path(env[variable]).mkdir(parents=True, exist_ok=True)
    # On by default in recent torch; set so that an older default or a base image's setting does not turn them off.
    env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    env.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    files = sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
    log.info("compile cache: %s (%s)", folder, f"{files} files from earlier jobs" if files else "empty: this job compiles")
    return folder
