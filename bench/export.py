"""The export job's cost: for each GGUF type, the time to write the file, its size and the peak memory (the resident set
of the process that wrote it, one fresh process per type and thread count).

    python3 bench/export.py --folder outputs/demo/merge/model --out DIR         # a merged model (after `make demo`)
    python3 bench/export.py --model 8b --out DIR                                # DeepSeek-R1-Distill-Llama-8B's shape
    python3 bench/export.py --model tiny --out DIR --types q8_0                 # the same pipeline in a minute

--model builds the architecture with seeded random bf16 weights once under --work (16 GB for 8b: on the GPU where
there is one, else on the CPU, a 5 GB shard at a time) with a byte-level BPE trained on the sample data, and reuses it
after; the vocabulary has 1,024 tokens and the 128,256-row embedding (the export writes the rows without a token as
unused entries), since the times and memory are the tensors'. Each measurement is a line of a table and an entry of
DIR/export-<model>-<date>.json: seconds inside medcot.export.write_gguf and for the whole process, file bytes, peak
resident memory against the 16-bit weights' bytes, threads.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.model import R1_DISTILL_LLAMA_8B, TINY  # noqa: E402

ARCHES = {"8b": R1_DISTILL_LLAMA_8B, "tiny": TINY}
SHARD_BYTES = 5 * 10**9  # the merge job's max_shard_size


def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE of 1,024 tokens trained on the sample's questions, BOS added, EOS its end token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rows = [json.loads(line) for line in (ROOT / "data" / "sample" / "medical_o1_sample.jsonl").read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([r["Question"] + "\n" + r["Complex_CoT"] for r in rows], trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def llama_tensors(arch: dict[str, Any]):
    """(name, shape) of every tensor of LlamaForCausalLM with this architecture, in the order transformers saves them."""
    h, inter, vocab = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"]
    kv = arch["num_key_value_heads"] * h // arch["num_attention_heads"]
    yield "model.embed_tokens.weight", (vocab, h)
    for i in range(arch["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield from ((p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                    (p + "mlp.down_proj.weight", (h, inter)), (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,)))
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (vocab, h)


def build_model(folder: Path, arch: dict[str, Any]) -> dict[str, Any]:
    """Random bf16 weights (seeded, std 0.02, norms 1) written shard by shard, so that memory holds one shard; with
    config.json, the shard index and the tokenizer, as the merge job writes a folder."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    t0 = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)
    shapes = list(llama_tensors(arch))
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    sizes = [0]
    for name, shape in shapes:  # group into shards of at most SHARD_BYTES, as transformers does
        nbytes = 2 * int(torch.tensor(shape).prod())
        if sizes[-1] and sizes[-1] + nbytes > SHARD_BYTES:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = shape
        sizes[-1] += nbytes
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": {}}
    for n, shard in enumerate(shards, 1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            if len(shape) == 1:
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(shape, generator=generator, device=device, dtype=torch.float32) * 0.02
                                 ).to(torch.bfloat16).cpu()
            index["weight_map"][name] = file
        save_file(tensors, folder / file, metadata={"format": "pt"})
        del tensors
        print(f"built {file} ({n}/{len(shards)}) after {time.monotonic() - t0:.0f} s", flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    # LlamaConfig edits rope_scaling in place; architectures as the merge job's save_pretrained writes it
    LlamaConfig(**copy.deepcopy(arch), dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(folder)
    build_tokenizer(folder)
    (folder / "BENCH_COMPLETE").write_text(json.dumps(arch, sort_keys=True))
    return {"build_s": round(time.monotonic() - t0, 1), "device": device}


def model_folder(args: argparse.Namespace) -> Path:
    if args.folder:
        return Path(args.folder)
    arch = ARCHES[args.model]
    folder = Path(args.work) / f"export-{args.model}"
    mark = folder / "BENCH_COMPLETE"
    if mark.is_file() and mark.read_text() == json.dumps(arch, sort_keys=True):
        print(f"reusing {folder}", flush=True)
    else:
        print(f"building the {args.model} model in {folder}: {build_model(folder, arch)}", flush=True)
    return folder


def child(folder: Path, type_name: str, workers: int, out: Path) -> None:
    """One export in this process; prints its measurements as one JSON line."""
    t0 = time.monotonic()
    from medcot.export import GgufModel, write_gguf

    model = GgufModel.read(folder, "recipe")
    ready_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = write_gguf(model, type_name, out, workers=workers, name=folder.name)
    result.update(process_s=round(time.monotonic() - t0, 2), workers=workers, rss_before_write=ready_rss,
                  peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print("RESULT " + json.dumps(result), flush=True)


def machine() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": cpu, "cpus": len(os.sched_getaffinity(0)), "memory_gib": round(
        os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1), "python": platform.python_version(),
        "gguf": version("gguf"), "numpy": version("numpy"), "torch": version("torch")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--folder", help="a merged model folder (the merge job's merge/model)")
    source.add_argument("--model", choices=sorted(ARCHES), help="build this architecture with random weights")
    parser.add_argument("--out", required=True, help="folder for the JSON result")
    parser.add_argument("--types", default="q8_0,f16", help="comma-separated export.types values")
    parser.add_argument("--workers", default="auto", help="comma-separated thread counts (auto = every CPU)")
    parser.add_argument("--work", default="/tmp/medcot-bench", help="where --model builds its folder and files go")
    if sys.argv[1:2] == ["--child"]:  # one measurement, in a process of its own: FOLDER TYPE THREADS FILE
        folder, type_name, workers, out = sys.argv[2:6]
        child(Path(folder), type_name, int(workers), Path(out))
        return 0
    args = parser.parse_args()
    folder = model_folder(args)
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    label = args.model or (folder.parent.parent.name if folder.name == "model" else folder.name)  # <run>/merge/model
    record = {"date": dt.date.today().isoformat(), "model": label, "folder": str(folder), "weights_bytes": weights,
              "machine": machine(), "runs": []}
    path = out_dir / f"export-{label}-{record['date']}.json"
    files = Path(args.work) / "export-files"
    files.mkdir(parents=True, exist_ok=True)
    print(f"{'type':<6} {'threads':>7} {'write s':>8} {'process s':>9} {'GB':>7} {'peak RSS GB':>11} "
          f"{'peak - weights GB':>17}", flush=True)
    for type_name in args.types.split(","):
        for w in args.workers.split(","):
            workers = machine()["cpus"] if w == "auto" else int(w)
            out = files / f"{label}-{type_name}.gguf"
            done = subprocess.run([sys.executable, __file__, "--child", str(folder), type_name, str(workers), str(out)],
                                  capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if done.returncode != 0 or line is None:
                print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
                return 1
            run = json.loads(line[len("RESULT "):])
            record["runs"].append(run)
            path.write_text(json.dumps(record, indent=2) + "\n")
            out.unlink()
            print(f"{type_name:<6} {workers:>7} {run['seconds']:>8.1f} {run['process_s']:>9.1f} {run['bytes'] / 1e9:>7.3f} "
                  f"{run['peak_rss'] / 1e9:>11.2f} {(run['peak_rss'] - weights) / 1e9:>17.2f}", flush=True)
    print(f"16-bit weights {weights / 1e9:.2f} GB; results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
