#!/usr/bin/env bash
# Refuse a llama-cpp-python wheel whose llama.cpp carries its own copy of the C++ runtime:
#     bash tests/llama_cpp_linkage.sh llama_cpp_python-*.whl
# A compiler that links libstdc++ statically (one whose lib folder holds only libstdc++.a, say a toolchain in /opt
# named by CXX) builds a libllama.so that works alone but crashes with SIGSEGV inside std::regex, while it loads a
# GPT-2-style vocabulary, in a process that has already loaded the system's libstdc++.so (numpy and torch do): the two
# copies' locale tables mix. Seen on an Ubuntu 24.04 machine whose CXX was such a GCC 13.3.
set -euo pipefail
whl=${1:?a llama-cpp-python wheel}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llama_cpp/lib/libllama.so', sys.argv[2])" "$whl" "$tmp"
needed=$(LD_LIBRARY_PATH= ldd "$tmp/llama_cpp/lib/libllama.so" 2>&1 || true)  # its siblings show as "not found"
if [[ $needed != *libstdc++.so* ]]; then
  echo "llama-cpp-python: $whl links the C++ runtime into llama.cpp statically (compiler: ${CXX:-c++})." >&2
  echo "  It would crash the tests in any process that also loads libstdc++.so (numpy, torch)." >&2
  echo "  Build it with a compiler that links libstdc++.so, e.g. the system's: CC=gcc CXX=g++ make test" >&2
  exit 1
fi
