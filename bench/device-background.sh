#!/usr/bin/env bash
# The whole benchmark on a GPU machine that you reach only by copying files to it and running commands of at most
# ~10 minutes each: the first command starts bench/device.sh in a process session of its own, so that it outlives
# the command, and follows it; each later command follows it on. Every command ends by copying the results JSON
# and the log into OUT (and prints the log's tail), so what was measured comes back even if the machine goes.
#     bash bench/device-background.sh start "$OUT" --sections peak,build,train   # then, until it says "finished":
#     bash bench/device-background.sh follow "$OUT"
# FOLLOW_S (default 560) is how long one command follows before it returns. GPU_TESTS=LOG (bench/device.sh) runs
# `pytest -m gpu` first; give it to both commands so that each copies the log into OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:?start or follow}
out=${2:?output folder}
shift 2
state=/tmp/medcot-bench-bg
mkdir -p "$state" "$out"

if [ "$mode" = start ]; then
  rm -f "$state"/exit
  setsid bash -c 'bash bench/device.sh "$@" --out '"$state"'/results --log '"$state"'/bench.log; echo $? > '"$state"'/exit' \
    bench "$@" > "$state"/stdout 2>&1 < /dev/null &
  echo "started: bench/device.sh $*"
elif [ "$mode" != follow ]; then
  echo "usage: $0 start|follow OUT [bench/run.py arguments]" >&2
  exit 2
fi

deadline=$((SECONDS + ${FOLLOW_S:-560}))
while [ ! -f "$state"/exit ] && [ $SECONDS -lt $deadline ]; do
  sleep 5
done
cp "$state"/results/*.json "$state"/stdout "$out"/ 2>/dev/null
[ -n "${GPU_TESTS:-}" ] && cp "$GPU_TESTS" "$out"/ 2>/dev/null
gzip -c "$state"/bench.log > "$out"/bench.log.gz 2>/dev/null
tail -n 40 "$state"/stdout
if [ -f "$state"/exit ]; then
  echo "finished: exit $(cat "$state"/exit)"
  exit "$(cat "$state"/exit)"
fi
echo "still running after ${FOLLOW_S:-560} s: run '$0 follow OUT' next"
