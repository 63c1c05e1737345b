"""Where a llama-cpp-python build crashes on a GGUF vocabulary: the same vocabulary-only load in a child process, one
variable at a time, and from a C program linked to the same libllama.so. A load that works in C and crashes in Python
points at the process (what else it loaded, and how); one that crashes in both, at the build.

    python bench/llama_crash_probe.py FILE.gguf SDIST.tar.gz [--site SITE_DIR]
    python bench/llama_crash_probe.py --vocab-of MODEL_DIR FILE.gguf   # writes a model's vocabulary alone (2 MB)

SITE_DIR holds the installed `llama_cpp` package (default: the one this Python imports); SDIST is its source, for
llama.h. Prints the compiler settings in the environment and what libllama.so links, then one line per variant with
its exit status (negative: the signal that killed it) and the tokens.

Seen with it: a build whose compiler (CXX, a GCC in /opt) linked libstdc++ statically loaded the SmolLM2 vocabulary
from C and from Python alone, and crashed in every process that had imported numpy (which loads libstdc++.so) first.
tests/llama_cpp_linkage.sh now refuses such a build.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# `import llama_cpp` runs the package's __init__, which imports numpy and the high-level API; this loads only its
# ctypes bindings (llama_cpp.llama_cpp), through a package module without __init__
RAW = r"""
import ctypes, sys, types
site, path, variant = sys.argv[1:4]
sys.path.insert(0, site)
if "numpy" in variant:
    import numpy
if "torch" in variant:
    import torch
if "local" in variant:
    ctypes.RTLD_GLOBAL = ctypes.RTLD_LOCAL  # llama_cpp dlopens its libraries with RTLD_GLOBAL
if "package" in variant:
    import llama_cpp
    raw = llama_cpp.llama_cpp
else:
    package = types.ModuleType("llama_cpp")
    package.__path__ = [site + "/llama_cpp"]
    sys.modules["llama_cpp"] = package
    import llama_cpp.llama_cpp as raw
maps = {line.split()[-1] for line in open("/proc/self/maps") if ".so" in line}
print("libstdc++ copies:", sorted(m for m in maps if "stdc++" in m), "| numpy" if "numpy" in sys.modules else "",
      flush=True)
raw.llama_backend_init()
params = raw.llama_model_default_params()
params.vocab_only = True
model = raw.llama_model_load_from_file(path.encode(), params)
assert model, "llama.cpp could not load it"
tokens = (raw.llama_token * 64)()
text = b"What causes gout?"
n = raw.llama_tokenize(raw.llama_model_get_vocab(model), text, len(text), tokens, 64, False, True)
print("tokens:", *tokens[:n], flush=True)
if "maps" in variant:
    print("libraries:", " ".join(sorted(maps)), flush=True)
"""

VARIANTS = {  # name: (extra environment, shell prefix)
    "ctypes only": ({}, ""),
    "ctypes only, RTLD_LOCAL": ({}, ""),
    "ctypes + numpy": ({}, ""),
    "ctypes + torch": ({}, ""),
    "package (as the tests), maps": ({}, ""),
    "package, LD_PRELOAD system libstdc++": ({"LD_PRELOAD": "libstdc++.so.6"}, ""),
    "package, stack unlimited": ({}, "ulimit -s unlimited; "),
    "package, LC_ALL=C": ({"LC_ALL": "C", "LANG": "C"}, ""),
}


def run(command: list[str], env: dict[str, str], prefix: str) -> tuple[int, str]:
    line = prefix + shlex.join(command)
    done = subprocess.run(["bash", "-c", line], env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    lines = [x for x in done.stdout.splitlines() if x.strip()]
    if done.returncode:  # llama.cpp's log, on stderr, only for a load that failed: its last lines
        lines += [x for x in done.stderr.splitlines() if x.strip()][-8:]
    return done.returncode, "\n    ".join(lines)


def write_vocab(model_dir: str, path: str) -> None:
    """A GGUF file with `model_dir`'s metadata and vocabulary as the export job writes them, and no tensors: enough for
    a vocabulary-only load."""
    import gguf
    from transformers import AutoConfig

    from medcot.export import _add_metadata, gguf_chat_template, gguf_vocab
    from medcot.modeling import load_tokenizer

    config, tokenizer = AutoConfig.from_pretrained(model_dir), load_tokenizer(model_dir)
    writer = gguf.GGUFWriter(path, "llama")
    _add_metadata(writer, config, gguf_vocab(tokenizer, config.vocab_size, tokenizer.eos_token_id),
                  gguf_chat_template("recipe", tokenizer), gguf.LlamaFileType.MOSTLY_F16, Path(model_dir).name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> int:
    if sys.argv[1:2] == ["--vocab-of"]:
        write_vocab(*sys.argv[2:4])
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("gguf")
    parser.add_argument("sdist")
    parser.add_argument("--site")
    args = parser.parse_args()
    site = args.site or str(Path(__import__("importlib.util").util.find_spec("llama_cpp").origin).parent.parent)
    lib = Path(site) / "llama_cpp" / "lib"
    print("environment:", {k: v for k, v in os.environ.items() if k.startswith(("LD_", "PYTHON", "MALLOC", "GLIBC", "CMAKE"))
          or k in ("CC", "CXX", "CFLAGS", "CXXFLAGS", "LDFLAGS")},
          "| ld.so.preload:", Path("/etc/ld.so.preload").read_text().strip() if Path("/etc/ld.so.preload").exists()
          else "none", flush=True)
    print(subprocess.run(["ldd", str(lib / "libllama.so")], capture_output=True, text=True).stdout, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(args.sdist) as sdist:
            sdist.extractall(tmp, filter="data", members=[m for m in sdist.getmembers() if "/include/" in m.name])
        top = next(Path(tmp).iterdir()) / "vendor" / "llama.cpp"
        exe = Path(tmp) / "vocab_load"
        build = subprocess.run(["gcc", "-O1", "-g", str(Path(__file__).with_name("llama_vocab_load.c")),
                                f"-I{top}/include", f"-I{top}/ggml/include", f"-L{lib}", "-lllama",
                                f"-Wl,-rpath,{lib}", "-o", str(exe)], capture_output=True, text=True)
        if build.returncode:
            print("C driver: did not build:", build.stderr[-2000:])
        else:
            rc, out = run([str(exe), args.gguf], {}, "")
            print(f"C driver: exit {rc}\n    {out}", flush=True)
            rc, out = run([str(exe), args.gguf], {}, "ulimit -s unlimited; ")
            print(f"C driver, stack unlimited: exit {rc}\n    {out}", flush=True)
    for name, (env, prefix) in VARIANTS.items():
        variant = name.replace("RTLD_LOCAL", "local").replace(" ", "-")
        rc, out = run([sys.executable, "-X", "faulthandler", "-c", RAW, site, args.gguf, variant], env, prefix)
        print(f"Python, {name}: exit {rc}\n    {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
