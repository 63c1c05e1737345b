#!/usr/bin/env bash
# bench/run.py on an offline GPU machine that has torch, transformers and peft but not the rest: installs the
# wheels carried in .whl/ (bench/wheels.sh: the lock's pins that the machine lacks) into /tmp/site, prints where
# the machine still differs from docker/requirements.lock, then runs the benchmark with the given arguments.
#     bash bench/device.sh --sections peak,build,train --out "$OUT"
#     GPU_TESTS=/tmp/gpu-tests.log bash bench/device.sh --sections build,chain --out "$OUT"   # pytest -m gpu first
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 bench/run.py --lock-diff
# GPU_TESTS=LOG: `pytest -m gpu` on the same packages, its output into LOG; before the benchmark, or after it with
# GPU_TESTS_AFTER=1; GPU_TESTS_K=EXPR selects tests (pytest -k). The benchmark runs either way.
gpu_tests() {
  [ -n "${GPU_TESTS:-}" ] || return 0
  local start=$SECONDS
  python3 -m pytest -q -m gpu -p no:cacheprovider ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} tests/test_gpu.py > "$GPU_TESTS" 2>&1
  echo "pytest -m gpu: exit $? after $((SECONDS - start)) s: $(tail -n 1 "$GPU_TESTS")" | tee -a "$GPU_TESTS"
}
[ -n "${GPU_TESTS_AFTER:-}" ] || gpu_tests
python3 bench/run.py "$@"
status=$?
[ -z "${GPU_TESTS_AFTER:-}" ] || gpu_tests
exit $status
