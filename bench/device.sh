#!/usr/bin/env bash
# bench/run.py on an offline GPU machine that has torch, transformers and peft but not the rest: installs the
# wheels carried in .whl/ (see ../shared/gpu-wheels/fetch.sh; trl 1.14.0 and the pydantic/rouge-score wheels
# added) into /tmp/site, then runs the benchmark with the given arguments.
#     bash bench/device.sh --sections peak,build,train --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec python3 bench/run.py "$@"
