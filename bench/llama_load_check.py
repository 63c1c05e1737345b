"""Does llama.cpp load a GGUF file here, and if it crashes, where: each file is loaded as the tests load it
(llama-cpp-python, vocabulary only, then the whole model) in a child process, once per llama-cpp-python build given and
once with torch imported first (the tests' processes hold torch and its OpenMP runtime). A crash is reported with its
signal and llama.cpp's last log lines, and run again under gdb (or cuda-gdb) where one is installed, for the native
stack.

    .venv/bin/python bench/llama_load_check.py export/demo-F16.gguf [--build SITE_DIR ...] [--metadata OUT.json]

--build names a folder that holds a `llama_cpp` package (a build for another instruction set, say); without it, the
installed one. Prints one line per load and exits 1 if any failed or crashed. --metadata writes each file's metadata as gguf-py
reads it (arrays as their length and sha256), to compare files written on two machines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

CHILD = r"""
import sys
if sys.argv[2] == "torch":
    import torch
    torch.ones(512, 512) @ torch.ones(512, 512)  # start its thread pool, as a test that trained a model has
import llama_cpp
print("llama_cpp from", llama_cpp.__file__, flush=True)
llm = llama_cpp.Llama(sys.argv[1], n_ctx=2048, vocab_only=True, verbose=True)
print("vocabulary: tokens", len(llm.tokenize("<|im_start|>user\nWhat causes gout?".encode(), add_bos=True, special=True)), flush=True)
del llm
if sys.argv[3] == "vocab":
    sys.exit(0)
llm = llama_cpp.Llama(sys.argv[1], n_ctx=512, verbose=True)
llm.eval(llm.tokenize(b"What causes gout?", add_bos=True))
print("model: evaluated", flush=True)
"""


def child_env(build: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if build:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [build, env.get("PYTHONPATH")]))
    return env


def load_in_child(path: str, *, build: str | None = None, first: str = "plain", what: str = "model") -> tuple[int, str]:
    """Load `path` in a child process (`what`: "vocab" or "model"; `first`: "torch" to import torch before): its exit
    status (negative: the signal that killed it) and its output, stderr last."""
    done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, str(path), first, what],
                          env=child_env(build), capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


def backtrace(path: str, build: str | None, first: str, what: str) -> str:
    gdb = shutil.which("gdb") or shutil.which("cuda-gdb")
    if not gdb:
        return "(no gdb here)"
    done = subprocess.run([gdb, "-batch", "-ex", "run", "-ex", "bt 40", "-ex", "info registers rip",
                           "-ex", "x/4i $pc", "--args", sys.executable, "-c", CHILD, path, first, what],
                          env=child_env(build), capture_output=True, text=True, timeout=900)
    lines = [line for line in (done.stdout + done.stderr).splitlines()
             if line.startswith(("#", "Thread", "rip", "=>", "   0x", "Program")) or "signal" in line]
    return "\n".join(lines[-70:])


def metadata(path: str) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {}
    for name, field in reader.fields.items():
        values = [bytes(field.parts[i]) for i in field.data]
        fields[name] = {"types": [t.name for t in field.types], "count": len(values),
                        "sha256": hashlib.sha256(b"\0".join(values)).hexdigest()}
        if len(values) == 1 and len(values[0]) <= 64:
            fields[name]["value"] = field.contents()
    tensors = {t.name: {"type": t.tensor_type.name, "shape": [int(n) for n in t.shape]} for t in reader.tensors}
    return {"fields": fields, "tensors": tensors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--build", action="append", default=[], help="a folder holding a llama_cpp package")
    parser.add_argument("--vocab-only", action="store_true", help="load only the vocabulary (a file without tensors)")
    parser.add_argument("--metadata", help="write the files' metadata here (JSON)")
    args = parser.parse_args()
    if args.metadata:
        with open(args.metadata, "w", encoding="utf-8") as f:
            json.dump({os.path.basename(p): metadata(p) for p in args.files}, f, indent=1, default=str)
    bad, what = False, "vocab" if args.vocab_only else "model"
    for path in args.files:
        for build in args.build or [None]:
            for first in ("plain", "torch"):
                rc, log = load_in_child(path, build=build, first=first, what=what)
                name = f"{os.path.basename(path)} | {build or 'installed build'} | {first}"
                if rc == 0:
                    print(f"ok      {name}", flush=True)
                    continue
                bad = True
                why = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit {rc}"
                print(f"{'CRASHED' if rc < 0 else 'FAILED '} {name}: {why}; last lines:", flush=True)
                print("\n".join("    " + line for line in log.splitlines()[-25:]), flush=True)
                if rc < 0:
                    print(backtrace(path, build, first, what), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
