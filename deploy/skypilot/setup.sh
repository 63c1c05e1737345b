#!/usr/bin/env bash
# `setup` of the launch files: what each new VM needs before the chain, on every node.
#   MEDCOT_RUNNER=docker (the default): the image medcot:latest, pulled from MEDCOT_IMAGE when that names one
#     (registry login with the REGISTRY_USERNAME and REGISTRY_PASSWORD secrets, when given), else built here from
#     docker/Dockerfile and its lock; then the image's own check that Triton compiles a kernel on this GPU.
#   MEDCOT_RUNNER=venv: the jobs run with $MEDCOT_VENV/bin/python, made by `make setup-gpu` unless it exists.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$SECONDS

case "${MEDCOT_RUNNER:-docker}" in
  venv)
    venv=${MEDCOT_VENV:-.venv}
    [ -x "$venv/bin/python" ] || make setup-gpu VENV="$venv"
    ;;
  docker)
    if [ -n "${MEDCOT_IMAGE:-}" ]; then
      if [ -n "${REGISTRY_PASSWORD:-}" ]; then
        printf '%s' "$REGISTRY_PASSWORD" \
          | docker login --username "${REGISTRY_USERNAME:?REGISTRY_USERNAME goes with REGISTRY_PASSWORD}" \
              --password-stdin "${MEDCOT_IMAGE%%/*}"
      fi
      docker pull --quiet "$MEDCOT_IMAGE"
      docker tag "$MEDCOT_IMAGE" medcot:latest
    else
      docker compose -f compose.yaml build
    fi
    # The driver, the container toolkit and Triton's compiler on this GPU, in seconds: a VM that cannot run the
    # image fails here, in setup, before anything is trained.
    docker run --rm --gpus all medcot:latest
    ;;
  *)
    echo "setup: MEDCOT_RUNNER=${MEDCOT_RUNNER} is neither docker nor venv" >&2
    exit 2
    ;;
esac
echo "setup: ready in $((SECONDS - start)) s (runner ${MEDCOT_RUNNER:-docker}${MEDCOT_IMAGE:+, image $MEDCOT_IMAGE})"
