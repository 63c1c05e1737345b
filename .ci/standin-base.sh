#!/usr/bin/env bash
# A stand-in for the image's base, nvidia/cuda:<version>-base-ubuntu24.04, on a machine that reaches no container
# registry but does reach Ubuntu's archive and the package registry (CI, and this project's development machines).
#   bash .ci/standin-base.sh            # tags the FROM image of docker/Dockerfile, unless it is there already
# It is the same Ubuntu 24.04 (Python 3.12) that the real base builds on, minus the CUDA runtime's environment,
# which a container without a GPU does not use. The machine's CA bundle and pip's `cert` setting go into the
# stand-in, not into the Dockerfile: they are what this network needs, not what the image needs.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=$(sed -n 's/^ARG CUDA_VERSION=//p' docker/Dockerfile)
tag="nvidia/cuda:${cuda}-base-ubuntu24.04"
if docker image inspect "$tag" >/dev/null 2>&1; then echo "stand-in base: have $tag"; exit 0; fi

root=${STANDIN_ROOT:-/tmp/medcot-standin/noble}
mirror=http://archive.ubuntu.com/ubuntu
# Debian's debootstrap has no Ubuntu keyring: fetch Ubuntu's, checked against the hash recorded here.
keyring_deb=ubuntu-keyring_2023.11.28.1_all.deb
keyring_sha256=36de43b15853ccae0028e9a767613770c704833f82586f28eb262f0311adb8a8
work=$(dirname "$root")
mkdir -p "$work"
if [ ! -x "$root/bin/bash" ]; then
  curl -fsS -m 120 -o "$work/$keyring_deb" "$mirror/pool/main/u/ubuntu-keyring/$keyring_deb"
  echo "$keyring_sha256  $work/$keyring_deb" | sha256sum -c --quiet
  dpkg-deb -x "$work/$keyring_deb" "$work/keyring"
  rm -rf "$root"
  debootstrap --variant=minbase --keyring="$work/keyring/usr/share/keyrings/ubuntu-archive-keyring.gpg" \
    noble "$root" "$mirror" /usr/share/debootstrap/scripts/gutsy > "$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; exit 1; }
fi
# The real base enables noble-updates and -security too; the build's apt-get sees the same archive.
printf 'deb %s noble main universe\ndeb %s noble-updates main universe\ndeb %s noble-security main universe\n' \
  "$mirror" "$mirror" "$mirror" > "$root/etc/apt/sources.list"
mkdir -p "$root/usr/local/share/ca-certificates" "$root/etc/ssl/certs"
cp /etc/ssl/certs/ca-certificates.crt "$root/usr/local/share/ca-certificates/host-bundle.crt"
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$root/etc/pip.conf"
(cd "$root" && tar -c . | docker import \
  -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c 'ENV NVIDIA_REQUIRE_CUDA=cuda>='"${cuda%.*}" - "$tag" >/dev/null)
echo "stand-in base: made $tag from Ubuntu noble"
