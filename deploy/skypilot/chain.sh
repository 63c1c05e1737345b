#!/usr/bin/env bash
# `run` of the launch files, on every node. The head node (SKYPILOT_NODE_RANK 0) runs the chain once:
# evaluate-before -> train -> merge -> evaluate-after -> push dry run (-> push with PUSH=1) -> report. The train
# job spans every node (num_nodes > 1: torchrun, its rendezvous from SkyPilot's variables, medcot/cli.py); the other
# nodes run only their part of it. Finished stages and complete checkpoints go to MEDCOT_DURABLE_DIR (the mounted
# bucket), so that the same command on a new VM skips what is done and resumes training (medcot/durable.py).
#   CONFIG, RUN_NAME, ARGS (KEY=VALUE overrides), PUSH=1: as for `make up`.
#   MEDCOT_RUNNER=docker (the default): compose.yaml with deploy/skypilot/compose.cloud.yaml.
#   MEDCOT_RUNNER=venv: the same jobs with $MEDCOT_VENV/bin/python, in this order (the tests run it so, on CPU).
set -uo pipefail
cd "$(dirname "$0")/../.."

export MEDCOT_DURABLE_DIR=${MEDCOT_DURABLE_DIR:?the durable folder: the launch file mounts the bucket there}
export CONFIG=${CONFIG:-configs/deepseek-r1-distill-llama-8b-medical.yaml}
export RUN_NAME=${RUN_NAME:-}
export GPUS=${GPUS:-${SKYPILOT_NUM_GPUS_PER_NODE:-1}}
# compose refuses to start while a secret's variable is undefined; empty: W&B logs offline.
export WANDB_API_KEY=${WANDB_API_KEY:-}
rank=${SKYPILOT_NODE_RANK:-0}
read -r -a overrides <<< "${ARGS:-}"
mkdir -p "$MEDCOT_DURABLE_DIR"

# The exit status that SkyPilot acts on: a stage stopped by a signal (a preemption notice) exits 143, which the
# launch files' job_recovery.recover_on_exit_codes turns into a recovery on a new VM, even while this VM still looks
# up to the controller; any other failure exits with its own status and ends the managed job.
finish() {
  local status=$1
  if [ "$status" -eq 0 ]; then
    [ "$rank" = 0 ] && echo "medcot chain: done; every stage is in $MEDCOT_DURABLE_DIR/ (the bucket)"
  elif [ "$status" -eq 130 ] || [ "$status" -eq 143 ]; then
    echo "medcot chain: stopped by a signal; the same launch resumes from the bucket" >&2
    status=143
  fi
  exit "$status"
}

# A VM's shutdown sends SIGTERM to every process: the job under way saves its checkpoint and exits 143. This script
# waits for it (a trap instead of dying at once), so that its own exit status is the job's.
trap 'echo "medcot chain: stop signal; the job under way saves and stops" >&2' TERM INT

if [ "${MEDCOT_RUNNER:-docker}" = venv ]; then
  py=${MEDCOT_VENV:-.venv}/bin/python
  job() {  # job SCRIPT [ARGS...]
    "$py" "jobs/$1" --config "$CONFIG" ${RUN_NAME:+--run-name "$RUN_NAME"} "${@:2}" "${overrides[@]}" || finish $?
  }
  if [ "$rank" != 0 ]; then
    job train.py
    finish 0
  fi
  job evaluate.py --stage before
  job train.py
  job merge.py
  job evaluate.py --stage after
  job push.py --dry-run
  if [ -n "${PUSH:-}" ]; then job push.py; fi
  job report.py
  finish 0
fi

compose=(docker compose -f compose.yaml -f deploy/skypilot/compose.cloud.yaml)
export OVERRIDES="${ARGS:-}"
if [ "$rank" != 0 ]; then
  "${compose[@]}" run --rm --no-deps train
  finish $?
fi
COMPOSE="docker compose" docker/up.sh -f compose.yaml -f deploy/skypilot/compose.cloud.yaml ${PUSH:+--profile push}
status=$?
if [ "$status" -ne 0 ]; then
  train_exit=$("${compose[@]}" ps --all --format '{{.ExitCode}}' train 2>/dev/null | head -n 1)
  case "$train_exit" in 130|143) status=143 ;; esac
fi
finish "$status"
