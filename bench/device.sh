#!/usr/bin/env bash
# bench/run.py on a GPU machine that you reach only by copying files to it (no package index), with torch,
# transformers and peft installed but not the rest: makes an environment of the lock's packages only (bench/lockenv.py:
# the wheels copied in .whl/, bench/wheels.sh's, and the machine's own packages that the lock names; not the hundred
# others it has, which libraries would import), prints where it still differs from docker/requirements.lock, then runs
# the benchmark with the given arguments in it.
#     bash bench/device.sh --sections peak,build,train --out "$OUT"
#     GPU_TESTS=/tmp/gpu-tests.log bash bench/device.sh --sections build,chain --out "$OUT"   # pytest -m gpu first
set -euo pipefail
cd "$(dirname "$0")/.."
LOCKENV=${LOCKENV:-/tmp/medcot-lockenv}
python3 bench/lockenv.py "$LOCKENV" $(ls .whl/*.whl 2>/dev/null)
python() { "$LOCKENV/bin/python" "$@"; }
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python bench/run.py --lock-diff
# GPU_TESTS=LOG: `pytest -m gpu` on the same packages, its output into LOG; before the benchmark, or after it with
# GPU_TESTS_AFTER=1; GPU_TESTS_K=EXPR selects tests (pytest -k). The benchmark runs either way.
gpu_tests() {
  [ -n "${GPU_TESTS:-}" ] || return 0
  local start=$SECONDS
  local rc=0
  python -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} tests/test_gpu.py tests/test_decoding.py > "$GPU_TESTS" 2>&1 || rc=$?
  echo "pytest -m gpu: exit $rc after $((SECONDS - start)) s: $(tail -n 1 "$GPU_TESTS")" | tee -a "$GPU_TESTS"
  return $rc
}
# Neither failure stops the other (set -e would): the exit is the benchmark's, else the tests'.
tests=0
[ -n "${GPU_TESTS_AFTER:-}" ] || gpu_tests || tests=$?
status=0
python bench/run.py "$@" || status=$?
[ -z "${GPU_TESTS_AFTER:-}" ] || gpu_tests || tests=$?
[ "$status" -ne 0 ] && exit "$status"
exit "$tests"
