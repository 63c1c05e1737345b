#!/usr/bin/env bash
# Install llama-cpp-python (pyproject.toml's gguf-check extra) for the tests, from a wheel built once:
#     bash tests/llama_cpp_wheel.sh .venv/bin/python          # `make test` runs it
# PyPI ships llama-cpp-python as source only, which compiles llama.cpp: about 6 minutes on 2 cores. The wheel is kept
# in $MEDCOT_CACHE/wheels (default ~/.cache/medcot/wheels) under its version and the processor's instruction set
# (llama.cpp is compiled for the CPU that builds it; the bindings load it with ctypes, whatever the Python), and
# reused by every later run. The
# source archive stays beside it: the tests read a vocabulary file that llama.cpp ships in it (Llama 3's tokenizer).
set -euo pipefail
py=${1:?the virtualenv python, e.g. .venv/bin/python}
cd "$(dirname "$0")/.."
pin=$(grep -oE '"llama-cpp-python==[^"]+"' pyproject.toml | tr -d '"')
version=${pin#*==}
cache=${MEDCOT_CACHE:-$HOME/.cache/medcot}/wheels
cpu=$({ grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m; } | sha256sum | cut -c1-12)
dir=$cache/llama-cpp-python-$version-$cpu
sdist=$cache/llama_cpp_python-$version.tar.gz
mkdir -p "$dir"
if [ ! -f "$sdist" ]; then
  "$py" -m pip download -q --no-deps --no-binary :all: -d "$cache" "$pin"
fi
if ! compgen -G "$dir/llama_cpp_python-$version-*.whl" >/dev/null; then
  start=$SECONDS
  echo "llama-cpp-python $version: building the wheel once into $dir (minutes)"
  rm -rf "$dir.tmp"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "$py" -m pip wheel -q --no-deps -w "$dir.tmp" "$sdist"
  bash tests/llama_cpp_linkage.sh "$dir.tmp"/llama_cpp_python-*.whl
  mv "$dir.tmp"/llama_cpp_python-*.whl "$dir/" && rm -rf "$dir.tmp"
  echo "llama-cpp-python $version: built in $((SECONDS - start)) s"
fi
"$(dirname "$py")/uv" pip install -q --python "$py" --find-links "$dir" --only-binary llama-cpp-python -e '.[gguf-check]'
