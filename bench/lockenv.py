"""A virtual environment of the lock's packages only, made from a GPU machine's preinstalled ones and the carried
wheels, so that what is measured imports what the image ships and nothing more.

The GPU machine comes with about a hundred packages that docker/requirements.lock lacks (scikit-learn, scipy, jax,
onnx...). Libraries import some of them whenever they are installed: transformers' generation utilities import
scikit-learn (with scipy, about 4 s of every job's start-up), which the image does not have. Installing wheels on top
does not hide them; this environment does:

    python3 bench/lockenv.py DIR [WHEEL...]      # then run DIR/bin/python

It holds the given wheels (installed into it, bench/wheels.sh's), and links to every installed distribution of the
running interpreter that the lock names, that a kept one or a given wheel requires (torch's CUDA libraries), or that
runs the tests (pytest, pytest-xdist); no other. It prints what it left out. Then it compiles every module to
bytecode, as pip does when the image is built (the wheels here are installed without it, and the machine's own
packages may lack it): otherwise the first job on the machine compiles torch's sources, seconds that no job in the
image pays.
"""

from __future__ import annotations

import compileall
import re
import subprocess
import sys
import time
import venv
from importlib.metadata import Distribution, distributions
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("pytest", "pytest-xdist")  # the tests' runner and its workers (bench/remote-tests.sh), and what they require


def lock_names(lock: Path) -> set[str]:
    return {canonicalize_name(n) for n in re.findall(r"^([A-Za-z0-9._-]+)==", lock.read_text(), re.M)}


def requirements(dist: Distribution) -> list[str]:
    """The names `dist` requires on this platform (no extras)."""
    env = {**default_environment(), "extra": ""}
    names = []
    for text in dist.requires or []:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None or req.marker.evaluate(env):
            names.append(canonicalize_name(req.name))
    return names


def kept(installed: dict[str, Distribution], wanted: set[str]) -> set[str]:
    """`wanted` and what its installed members require, transitively, among `installed`."""
    keep: set[str] = set()
    todo = [n for n in wanted if n in installed]
    while todo:
        name = todo.pop()
        if name in keep:
            continue
        keep.add(name)
        todo += [r for r in requirements(installed[name]) if r in installed and r not in keep]
    return keep


def link_files(base: Path, site: Path, files: list[tuple[str, ...]]) -> list[Path]:
    """Link a distribution's entries of site-packages (`files`: its RECORD paths, split) from `base` into `site`: each
    top-level entry as one link, unless `site` already has a real folder of that name (a namespace package such as
    google/, which a wheel installed here and the machine's protobuf share): then its entries one level down, and
    so on. Returns what was linked."""
    linked = []
    for entry in sorted({f[0] for f in files if f and f[0] != ".."}):
        source, link = base / entry, site / entry
        if not source.exists():
            continue
        if not link.exists() and not link.is_symlink():
            link.symlink_to(source)
            linked.append(source)
        elif link.is_dir() and not link.is_symlink() and source.is_dir():
            linked += link_files(source, link, [f[1:] for f in files if len(f) > 1 and f[0] == entry])
    return linked


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    target, wheels = Path(argv[0]).resolve(), argv[1:]
    venv.EnvBuilder(clear=True, with_pip=False, symlinks=True).create(target)
    site = Path(subprocess.check_output([str(target / "bin" / "python"), "-c",
                                         "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--target", str(site), *wheels], check=True)
    wheel_dists = list(distributions(path=[str(site)]))
    from_wheels = {canonicalize_name(d.metadata["Name"]) for d in wheel_dists}

    installed: dict[str, Distribution] = {}
    for dist in distributions():  # the running interpreter's, first found wins as on import
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in installed and Path(str(dist.locate_file(""))).resolve() != site:
            installed[name] = dist
    lock = lock_names(ROOT / "docker" / "requirements.lock")
    wheel_needs = {r for d in wheel_dists for r in requirements(d)}
    keep = kept(installed, (lock | set(TOOLS) | wheel_needs) - from_wheels) - from_wheels
    targets = [site]
    for name in sorted(keep):
        dist = installed[name]
        targets += link_files(Path(str(dist.locate_file(""))), site, [f.parts for f in dist.files or []])
    t0 = time.monotonic()
    for target_path in targets:  # compile_dir does not follow the links: compile what they point at
        if target_path.is_dir():
            compileall.compile_dir(target_path, quiet=2, workers=0)
        elif target_path.suffix == ".py":
            compileall.compile_file(target_path, quiet=2)
    compiled_s = time.monotonic() - t0
    left_out = sorted(set(installed) - keep - from_wheels)
    beyond_lock = sorted(keep - lock - set(TOOLS))
    print(f"lock environment {target}: {len(from_wheels)} packages from wheels, {len(keep)} of this machine's "
          f"({len(beyond_lock)} beyond the lock, required by those: {' '.join(beyond_lock) or 'none'}); "
          f"{len(left_out)} left out: {' '.join(left_out)}; bytecode compiled in {compiled_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
