#!/usr/bin/env bash
# Wheels that make an offline GPU machine run the image's pins (docker/requirements.lock): every locked package
# that the machine lacks or has at another version, per its `pip list --format=freeze` (FREEZE).
#     bash bench/wheels.sh FREEZE [DIR]        # DIR defaults to .whl; then copy DIR to the machine with the checkout
# For a machine that you reach only by copying files to it, 64 MiB at a time: some packages stay the machine's own,
# and the run names them:
#   - torch, triton, torchvision and the CUDA libraries (cuda-*, nvidia-*): GBs; the lock holds the machine's own
#     torch 2.11.0 for this reason (docker/constraints.txt);
#   - LEAVE_OUT below: data-frame, image, plotting and download libraries, not on the path that is timed, and two
#     that unsloth requires but never imports (diffusers, hf-transfer; `grep -r` of unsloth and unsloth-zoo).
# Two wheels are slimmed (files removed, code unchanged): bitsandbytes keeps its CUDA 13.0 and CPU libraries of
# its fifteen, unsloth drops its bundled web UI (studio/).
# On the machine: bash bench/device.sh installs DIR/*.whl and prints what still differs from the lock.
set -euo pipefail
# LOCK (docker/requirements.lock) and LEAVE_OUT may be given: bench/remote-tests.sh asks for its .venv's set.
freeze=${1:?the GPU machine\'s pip freeze}
dir=${2:-.whl}
cd "$(dirname "$0")/.."
LOCK=${LOCK:-docker/requirements.lock}
LEAVE_OUT=${LEAVE_OUT:-'^(pyarrow|pandas|numpy|pillow|fonttools|hf-xet|aiohttp|cuda-bindings|cuda-pathfinder|diffusers|hf-transfer)$'}
mkdir -p "$dir"
mapfile -t pins < <(.venv/bin/python - "$freeze" "$LEAVE_OUT" "$LOCK" <<'EOF'
import re, sys
from packaging.utils import canonicalize_name
freeze, leave_out, lock = sys.argv[1], re.compile(sys.argv[2]), sys.argv[3]
have = {canonicalize_name(n): v for n, _, v in (l.strip().partition("==") for l in open(freeze)) if v}
for name, version in re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", open(lock).read(), re.M):
    key = canonicalize_name(name)
    too_large = re.match(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-toolkit)$", key)
    if have.get(key) != version and not too_large and not leave_out.match(key):
        print(f"{name}=={version}")
EOF
)
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
for pin in "${pins[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$dir" "$pin" 2>/dev/null || python3 -m pip wheel -q --no-deps -w "$dir" "$pin"  # sdists (rouge-score)
done

slim() {  # slim WHEEL PATTERN: drop the files matching PATTERN (grep -E) from WHEEL and from its RECORD
  local whl name tmp
  whl=$(realpath "$1"); name=$(basename "$whl" | cut -d- -f1-2); tmp=$(mktemp -d)
  (cd "$tmp" && unzip -q "$whl" && find . -type f | sed 's|^\./||' | grep -E "$2" | xargs -r rm -f \
    && grep -vE "$2" "$name".dist-info/RECORD > R && mv R "$name".dist-info/RECORD && rm "$whl" && zip -qr "$whl" .)
  rm -rf "$tmp"
}
for whl in "$dir"/bitsandbytes-*.whl; do
  [ -e "$whl" ] && slim "$whl" '^bitsandbytes/libbitsandbytes_(cuda(11|12)[0-9]|cuda13[1-9]|rocm)[0-9]*\.so$'
done
for whl in "$dir"/unsloth-20*.whl; do
  [ -e "$whl" ] && slim "$whl" '^studio/'
done
du -sh "$dir"
