#!/usr/bin/env bash
# A Docker engine for the container tests on a CI machine with no container registry: Debian's docker.io
# (Engine 20.10), started here; Compose v2 as a CLI plugin (the project's pinned binary, `make setup`); and the
# stand-in for the image's base (.ci/standin-base.sh). Run as root, after `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  (nohup dockerd > /tmp/dockerd.log 2>&1 &)
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { tail -20 /tmp/dockerd.log; exit 1; }
fi
if ! docker compose version >/dev/null 2>&1; then
  mkdir -p ~/.docker/cli-plugins
  ln -sf "$PWD/.venv/bin/docker-compose" ~/.docker/cli-plugins/docker-compose
fi
echo "engine $(docker version --format '{{.Server.Version}}'), $(docker compose version)"
bash .ci/standin-base.sh
