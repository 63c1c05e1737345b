"""GPU benchmarks of medcot's train and evaluate paths on a Llama-3.1-8B-shaped model with random weights.

    python3 bench/run.py                                   # every section (about 30 minutes on an H100)
    python3 bench/run.py --sections peak,train,reference   # some sections, in this order
    python3 bench/run.py --sections build,chain,reference  # the five jobs as the chain runs them, then the train job
    python3 bench/run.py --tiny --work /tmp/bt             # the same pipeline on a 2-layer model (smoke test)
    python3 bench/run.py --render bench/results/*.json     # rewrite BENCHMARKS.md from the results files

Every number goes through medcot's own code: training through `medcot.training.run_training` with a
config from `medcot.config.load_config`, the reference workload as the train job itself in a subprocess
(`jobs/train.py --config FILE`, so import and model load count), generation through
`medcot.generation.generate` on `medcot.modeling.load_with_adapter`. Each backend runs in its own process:
Unsloth patches transformers when imported, so the transformers baseline must never share a process with it.
Results are written after every measurement, so a section cut off by its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

from bench import chain, decode, generation, model, peak, reference, train
from bench.common import ROOT, Session, environment, lock_differences, merge_results
from bench.model import R1_DISTILL_LLAMA_8B, TINY
from bench.render import Part, load_parts, page_sources, render, write_benchmarks_md

# What `--worker KIND` runs, in the fresh process that run_worker starts.
WORKERS = {"peak": peak.worker_peak, "build": model.worker_build, "train": train.worker_train,
           "eval": generation.worker_eval, "decode": decode.worker_decode}
# What each name of --sections runs (in this process; it starts the workers).
SECTIONS = {"peak": peak.run_section, "build": model.run_section, "chain": chain.run_section, "train": train.run_section,
            "levers": train.run_section, "reference": reference.run_section, "eval": generation.run_section,
            "decode": decode.run_section}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="peak,build,chain,train,levers,reference,eval",
                        help="comma-separated, run in this order: peak, build, chain, train, levers, reference, eval")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model of the same vocabulary: checks the benchmark, not the GPU")
    parser.add_argument("--work", default="/tmp/medcot-bench", help="model, data and run folders (about 17 GB)")
    parser.add_argument("--out", help="folder of the results JSON (default bench/results; WORK with --tiny)")
    parser.add_argument("--log", help="every worker's output (default: WORK/bench.log)")
    parser.add_argument("--deadline-s", type=float, default=3600, help="stop starting work after this many seconds")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed optimizer steps per training shape (compilation)")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per training shape (Unsloth)")
    parser.add_argument("--baseline-steps", type=int, default=2, help="timed steps per shape on the transformers path")
    parser.add_argument("--train-runs", default="unsloth:unsloth:default,unsloth:unsloth:padding_free,transformers:unsloth",
                        help="section train: BACKEND:CHECKPOINTING[:LAYOUT][@BxL+BxL], layout default (medcot's rule), "
                             "padded or padding_free")
    parser.add_argument("--lever-runs", default="unsloth:true:padded,unsloth:false:padded",
                        help="section levers: more runs of the same form (plain and no checkpointing)")
    parser.add_argument("--profile", action="store_true", help="profile two more steps of 2x2048 in every train run")
    parser.add_argument("--reference", default="8x1:auto,8x1:auto:cold,8x1:unsloth,2x4:auto",
                        help="reference-workload variants MICROxACCUM:CHECKPOINTING[:FLAG...], checkpointing auto, unsloth, true "
                             "or false; the default: the recipe as shipped with the session's compile cache and with an empty "
                             "one, with checkpointing (what GPUs under ~80 GB get), and the notebook's 2 x 4 layout; "
                             "flags padded, padding_free, rebalance, grouped, cold (an empty compile cache)")
    parser.add_argument("--compile-cache", help="compiled kernels shared by every job and worker, as the containers share "
                                                "them (MEDCOT_COMPILE_CACHE; default WORK/compile)")
    parser.add_argument("--eval", default="transformers-16bit-static,transformers-16bit-static:256,transformers-16bit-static-sdpa,"
                                          "transformers-4bit,unsloth-4bit:256",
                        help="generation variants: unsloth-4bit, transformers-4bit, transformers-16bit-static (-sdpa: "
                             "eval.attention=sdpa), each with an optional :NEW_TOKENS")
    parser.add_argument("--eval-batches", default="1,8,32")
    parser.add_argument("--chain-without-cache", action="store_true",
                        help="after the chain, evaluate-after again on an empty compile cache")
    parser.add_argument("--chain-overrides", default="",
                        help="comma-separated KEY=VALUE config overrides given to every job of the chain, e.g. "
                             "eval.decode_compile=false")
    parser.add_argument("--decode-kernels", default="auto",
                        help="the decode section's runs, each compiled and run in full: [eval.decoder:]eval.decode_kernel "
                             "(auto, graph or transformers; auto, triton, sdpa, efficient, matmul), then :eager for "
                             "eval.decode_compile=false, e.g. graph:triton,graph:triton:eager,transformers:efficient")
    parser.add_argument("--new-tokens", type=int, default=1200, help="generated tokens per answer")
    parser.add_argument("--baseline-new-tokens", type=int, default=128,
                        help="generated tokens per answer for transformers-4bit (about 8 tokens/s at batch 1)")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only write BENCHMARKS.md from these results")
    parser.add_argument("--lock-diff", action="store_true", help="only print where this machine differs from the lock")
    parser.add_argument("--benchmarks-md", help="the report to write (default BENCHMARKS.md; WORK/BENCHMARKS.md with --tiny)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        WORKERS[args.worker](json.loads(args.spec))
        return 0
    work = Path(args.work)
    args.out = args.out or str(work if args.tiny else ROOT / "bench" / "results")
    args.benchmarks_md = args.benchmarks_md or str(work / "BENCHMARKS.md" if args.tiny else ROOT / "BENCHMARKS.md")
    if args.lock_diff:
        differences = lock_differences()
        for name, d in sorted(differences.items()):
            print(f"{name}: {d['installed'] or 'not installed'} here, {d['lock']} in docker/requirements.lock")
        print(f"{len(differences)} package(s) differ from the lock")
        return 0
    if args.render:
        parts = load_parts(args.render)
        for name in write_benchmarks_md(Path(args.benchmarks_md), parts):
            print(f"{name}: no table shows it any more; move it to bench/results/history/")
        for part in parts:
            if part.kind is None:
                print(f"{part.name}: another script's results (no table; the notes cite it)")
        print(f"wrote {args.benchmarks_md}")
        return 0

    deadline = time.monotonic() + args.deadline_s
    out = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    arch = TINY if args.tiny else R1_DISTILL_LLAMA_8B
    model_dir = work / ("tiny-llama" if args.tiny else "r1-distill-llama-8b-random")
    meta = {**environment(), "tiny": args.tiny, "arch": arch, "sections": args.sections}
    slug = re.sub(r"[^a-z0-9]+", "-", meta["gpu"].lower().replace("nvidia", "")).strip("-")
    path = out / f"{meta['date']}-{slug}{'-tiny' if args.tiny else ''}.json"
    results: dict[str, Any] = {"meta": meta, "peak": {}, "build": {}, "chain": {}, "train": {}, "reference": {}, "eval": {}, "decode": {}}
    if path.is_file():  # a second run on the same day and GPU adds to the first
        results = merge_results([json.loads(path.read_text()), {"meta": meta}])

    def save() -> None:
        # The page as it will read: the committed results with this run's in place (a --tiny run's alone).
        path.write_text(json.dumps(results, indent=2))
        write_benchmarks_md(Path(args.benchmarks_md), load_parts([path] if args.tiny else page_sources(path)))

    args.compile_cache = args.compile_cache or str(work / "compile")
    os.environ["MEDCOT_COMPILE_CACHE"] = args.compile_cache  # every job and worker inherits it
    common = {"model_dir": str(model_dir), "work": str(work), "arch": arch}
    log_path = Path(args.log) if args.log else work / "bench.log"
    with log_path.open("a") as log:
        session = Session(args, work, model_dir, deadline, log, common, results, save)
        for section in args.sections.split(","):
            if section not in SECTIONS:
                parser.error(f"unknown section {section!r}")
            SECTIONS[section](session, section)
            save()
    print(f"results: {path}; log: {log_path}\n")
    print(render([Part(path.name, results)]))
    return 0
