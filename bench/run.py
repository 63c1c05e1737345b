"""GPU benchmarks of medcot's train and evaluate paths on a Llama-3.1-8B-shaped model with random weights.

    python3 bench/run.py                                   # every section (about 30 minutes on an H100)
    python3 bench/run.py --sections peak,train,reference   # some sections, in this order
    python3 bench/run.py --tiny --work /tmp/bt             # the same pipeline on a 2-layer model (smoke test)
    python3 bench/run.py --render bench/results/A.json [B.json ...]   # rewrite BENCHMARKS.md from results

Every number goes through medcot's own code: training through `medcot.training.run_training` with a
config from `medcot.config.load_config`, the reference workload as the train job itself in a subprocess
(`jobs/train.py --config FILE`, so import and model load count), generation through
`medcot.evaluate.generate` on `medcot.modeling.load_with_adapter`. Each backend runs in its own process:
Unsloth patches transformers when imported, so the transformers baseline must never share a process with it.
Results are written after every measurement, so a section cut off by its time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medcot.attention import GQA_DECODE  # noqa: E402  (no torch at import)
from medcot.modeling import checkpointing_name  # noqa: E402

# The architecture of deepseek-ai/DeepSeek-R1-Distill-Llama-8B (its config.json), which is Llama-3.1-8B's.
R1_DISTILL_LLAMA_8B: dict[str, Any] = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu",
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128001, pad_token_id=128004, tie_word_embeddings=False, initializer_range=0.02,
)
# --tiny: the same pipeline in minutes, to check the benchmark itself (numbers are meaningless).
TINY = {**R1_DISTILL_LLAMA_8B, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}
N_SPECIAL = 256  # Llama-3 keeps its last 256 ids for special tokens: 128000 BOS, 128001 EOS, 128004 padding
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<|finetune_right_pad_id|>"

TRAIN_SHAPES = [(2, 1024), (2, 2048), (8, 2048)]
# training.padding_free per layout name: auto leaves it to Unsloth (padding-free on GPUs it has not measured).
# "default" leaves it unset: medcot's rule (padded on Hopper, Unsloth's own choice on older GPUs).
LAYOUTS: dict[str, bool | None] = {"default": None, "padded": False, "padding_free": True}
# Token lengths of the synthetic reference rows: medical-o1-reasoning-SFT (en) rows average about 1,000
# tokens with the R1 tokenizer and have a long right tail. Log-normal with median 900 and sigma 0.46 has
# mean 900 * exp(0.46**2 / 2) = 1,000; clipped to [300, 2048] (2048 = the recipe's max_seq_length).
REF_MEDIAN, REF_SIGMA, REF_MIN, REF_MAX = 900, 0.46, 300, 2048

# Issue 5's targets (H100 80GB), checked in BENCHMARKS.md.
TARGETS = {
    "unsloth_2x2048_tokens_per_s": 9500, "unsloth_vs_transformers_2x2048": 3.5, "unsloth_2x2048_peak_gib": 8.0,
    "mfu_8x2048": 0.50, "reference_wall_s": 90, "eval_b32_tokens_per_s": 2000, "eval_b1_tokens_per_s": 65,
    "eval_vs_transformers_4bit": 3.0,
}


# ---- the model and its tokenizer -------------------------------------------------------------------

def build_tokenizer(folder: Path, vocab_size: int):
    """A word-level tokenizer whose vocabulary covers all of Llama-3's ids: the words of the prompt
    templates, then `w0`, `w1`, ... up to id 127999, then 256 special tokens. A synthetic row of N words
    is exactly N tokens, which is how rows of a chosen token length are made."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from medcot.prompts import INFERENCE_TEMPLATE, TRAIN_TEMPLATE

    n_words = vocab_size - N_SPECIAL
    template_words = dict.fromkeys(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(TRAIN_TEMPLATE + INFERENCE_TEMPLATE))
    words = list(template_words) + [f"w{i}" for i in range(n_words - len(template_words))]
    specials = {0: BOS, 1: EOS, 4: PAD}
    special_tokens = [specials.get(k, f"<|reserved_special_token_{k}|>") for k in range(N_SPECIAL)]
    vocab = {w: i for i, w in enumerate(words + special_tokens)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special_tokens[-1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special_tokens)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=special_tokens[-1], model_max_length=131072)
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, arch: dict[str, Any]) -> dict[str, Any]:
    """Random bf16 weights (seeded) built on the GPU, saved as safetensors with the tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, arch["vocab_size"])
    torch.manual_seed(0)
    config = LlamaConfig(**copy.deepcopy(arch), dtype="bfloat16")  # it writes rope_theta into rope_scaling
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # CPU only for a --tiny check of this script
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    built = time.monotonic()
    model.save_pretrained(folder, max_shard_size="5GB")
    saved = time.monotonic()
    params = sum(p.numel() for p in model.parameters())
    (folder / "BENCH_COMPLETE").write_text(json.dumps(arch, sort_keys=True))
    return {"params": params, "build_s": round(built - t0, 1), "save_s": round(saved - built, 1),
            "bytes": sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")}


def model_is_built(folder: Path, arch: dict[str, Any]) -> bool:
    mark = folder / "BENCH_COMPLETE"
    return mark.is_file() and mark.read_text() == json.dumps(arch, sort_keys=True)


# ---- counting ---------------------------------------------------------------------------------------

def frozen_matmul_params(arch: dict[str, Any]) -> int:
    """Weights of every matrix product of a forward pass: the 7 projections of each layer and lm_head."""
    h, inter, kv = arch["hidden_size"], arch["intermediate_size"], arch["num_key_value_heads"]
    head = h // arch["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv * head + 3 * h * inter
    return arch["num_hidden_layers"] * per_layer + h * arch["vocab_size"]


def train_flops_per_token(arch: dict[str, Any], seq_len: float, lora_params: int) -> float:
    """Model FLOPs of one trained token under LoRA (recomputation by checkpointing not counted):
    frozen weights 2 (forward) + 2 (gradient w.r.t. activations) per weight, no weight gradient;
    LoRA weights 6 per weight (they do get weight gradients); causal attention (QK^T and PV over
    seq/2 keys on average: 2 * seq * hidden forward per layer, 3x that with backward)."""
    attention = 6 * arch["num_hidden_layers"] * seq_len * arch["hidden_size"]
    return 4 * frozen_matmul_params(arch) + 6 * lora_params + attention


# ---- workers (each runs in its own process) --------------------------------------------------------

def _write(path: str, data: Any) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def worker_peak(spec: dict) -> None:
    """bf16 matmul rate of this GPU: median of 30 timed 8192^3 products after warm-up (CUDA events)."""
    import torch

    n = 8192
    pairs = [(torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16))
             for _ in range(2)]
    for a, b in pairs * 5:
        a @ b
    times = []
    for i in range(30):
        a, b = pairs[i % 2]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    median = statistics.median(times)
    _write(spec["result"], {"matmul_bf16_tflops": round(2 * n**3 / median / 1e12, 1), "n": n, "median_ms": round(median * 1e3, 3)})


def worker_build(spec: dict) -> None:
    folder, arch = Path(spec["model_dir"]), spec["arch"]
    if model_is_built(folder, arch):
        _write(spec["result"], {"reused": True})
        return
    _write(spec["result"], {"reused": False, **build_model(folder, arch)})


def _base_overrides(spec: dict) -> list[str]:
    return [
        f"model.name={spec['model_dir']}", f"model.backend={spec['backend']}", "model.load_in_4bit=true",
        "model.max_seq_length=2048", f"output_dir={spec['work']}", "run_name=bench", "tracking.report_to=none",
    ]


def worker_train(spec: dict) -> None:
    """Load once, then per shape one `run_training` (the train job's trainer, callbacks and settings) of
    `warmup_steps + steps` optimizer steps on rows of exactly that length; the rate is that of the last
    `steps` steps, timed by a callback the trainer is given on top of its own."""
    import torch

    from medcot.cli import setup_logging
    from medcot.config import load_config
    from medcot.modeling import select_backend

    setup_logging()
    layout = spec["layout"]
    base = _base_overrides(spec) + [f"lora.use_gradient_checkpointing={spec['gc']}"]
    if LAYOUTS[layout] is not None:
        base.append(f"training.padding_free={str(LAYOUTS[layout]).lower()}")
    config = load_config(None, base)
    runtime = select_backend(config.model)  # imports Unsloth, when chosen, before transformers
    from datasets import Dataset
    from transformers import TrainerCallback

    import medcot.training as training
    from medcot.modeling import add_lora, load_model

    for old in Path(spec["work"]).glob(f"ckpt-*-{runtime.backend}-{spec['gc']}-{layout}-*"):
        shutil.rmtree(old)  # a measurement never resumes an earlier one

    class StepProfiler(TrainerCallback):
        """torch.profiler over optimizer steps (first, last]: where a step's host and GPU time go."""

        def __init__(self, first: int, last: int) -> None:
            self.first, self.last, self.prof, self.t0, self.wall = first, last, None, 0.0, None
            self.sync_sites: dict[str, int] = {}
            self._saved: dict[str, Any] = {}

        def _track_syncs(self, on: bool) -> None:
            """Count the Python call sites that read a CUDA tensor back to the host (each one waits for the GPU)."""
            import traceback

            names = ("item", "tolist", "__bool__", "__int__", "__float__")
            if not on:
                for name in names:
                    setattr(torch.Tensor, name, self._saved[name])
                return
            sites = self.sync_sites

            def wrap(name, original):
                def reader(tensor, *a, **k):
                    if tensor.is_cuda:
                        frames = [f for f in traceback.extract_stack(limit=12)[:-1] if "/torch/" not in f.filename][-3:]
                        key = f"{name} <- " + " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))
                        sites[key] = sites.get(key, 0) + 1
                    return original(tensor, *a, **k)
                return reader

            for name in names:
                self._saved[name] = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, wrap(name, self._saved[name]))

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == self.first and self.prof is None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.prof = torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
                self.prof.__enter__()
                self._track_syncs(True)
                self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == self.last and self.prof is not None and self.wall is None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.wall = time.perf_counter() - self.t0
                self._track_syncs(False)
                self.prof.__exit__(None, None, None)

    class StepTimer(TrainerCallback):
        """(time, tokens seen) at each step's log: logs come after the loss is read back from the GPU, so
        the interval between two logs is whole steps, without compilation, start-up or the final checkpoint."""

        def __init__(self) -> None:
            self.marks: dict[int, tuple[float, int]] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.marks[state.global_step] = (time.perf_counter(), state.num_input_tokens_seen)

    timer = StepTimer()
    extra_callbacks: list = []
    build_trainer = training.build_trainer

    def build_timed_trainer(*args, **kwargs):
        trainer = build_trainer(*args, **kwargs)
        for callback in [timer, *extra_callbacks]:
            trainer.add_callback(callback)
        return trainer

    training.build_trainer = build_timed_trainer  # run_training looks it up at call time

    t0 = time.monotonic()
    model, tokenizer = load_model(config, runtime, for_training=True)
    model = add_lora(model, config.lora, runtime, config.model.max_seq_length)
    load_s = time.monotonic() - t0
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_words = spec["arch"]["vocab_size"] - N_SPECIAL
    out: dict[str, Any] = {"backend": runtime.backend, "gc": spec["gc"], "load_s": round(load_s, 1),
                           "lora_params": lora_params, "shapes": []}
    generator = torch.Generator().manual_seed(0)
    warm, steps = spec["warmup_steps"], spec["steps"]
    for batch, seq in spec["shapes"]:
        entry: dict[str, Any] = {"batch": batch, "seq_len": seq, "warmup_steps": warm, "steps": steps}
        cfg = load_config(None, base + [
            f"training.per_device_train_batch_size={batch}", "training.gradient_accumulation_steps=1",
            f"training.max_steps={warm + steps}", "training.warmup_steps=0", "training.logging_steps=1",
        ])
        ids = torch.randint(0, n_words, (batch * (warm + steps), seq), generator=generator).tolist()
        timer.marks.clear()
        try:
            _, summary, _ = training.run_training(cfg, runtime, model, tokenizer, Dataset.from_dict({"input_ids": ids}),
                                                  Path(spec["work"]) / f"ckpt-train-{runtime.backend}-{spec['gc']}-{layout}-{batch}x{seq}")
            (t_a, n_a), (t_b, n_b) = timer.marks[warm], timer.marks[warm + steps]
            tokens = batch * seq * steps
            entry.update(
                tokens=tokens, counted_tokens=n_b - n_a, seconds=round(t_b - t_a, 3),
                tokens_per_s=round(tokens / (t_b - t_a), 1), whole_run_s=summary["train_runtime_s"],
                peak_memory_gib=summary["peak_memory_gib"], losses=[x["loss"] for x in summary["losses"]],
                flops_per_token=train_flops_per_token(spec["arch"], seq, lora_params),
            )
        except torch.cuda.OutOfMemoryError:
            entry["error"] = "CUDA out of memory"
            torch.cuda.empty_cache()
        out["shapes"].append(entry)
        _write(spec["result"], out)

    if spec.get("profile"):  # two more steps of the first shape, under the profiler
        batch, seq = spec["shapes"][0] if len(spec["shapes"]) == 1 else (2, 2048)
        cfg = load_config(None, base + [
            f"training.per_device_train_batch_size={batch}", "training.gradient_accumulation_steps=1",
            f"training.max_steps={warm + 2}", "training.warmup_steps=0", "training.logging_steps=1",
        ])
        profiler = StepProfiler(warm, warm + 2)
        extra_callbacks.append(profiler)
        ids = torch.randint(0, n_words, (batch * (warm + 2), seq), generator=generator).tolist()
        training.run_training(cfg, runtime, model, tokenizer, Dataset.from_dict({"input_ids": ids}),
                              Path(spec["work"]) / f"ckpt-profile-{runtime.backend}-{spec['gc']}-{layout}-{batch}x{seq}")
        out["profile"] = {"batch": batch, "seq_len": seq, "steps": 2, **profile_summary(profiler.prof, profiler.wall, 2),
                          "host_reads_per_step": {k: n // 2 for k, n in sorted(profiler.sync_sites.items(), key=lambda kv: -kv[1])[:12]}}
        _write(spec["result"], out)


def profile_summary(prof, wall_s: float, steps: int) -> dict[str, Any]:
    """Per optimizer step: wall time, GPU kernel time, kernel launches, host-device syncs (with where they
    come from), and the host operations that cost the most."""
    from torch.autograd import DeviceType

    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA)
    launches = sum(e.count for e in events if "LaunchKernel" in e.key)
    syncs = {e.key: (e.count, e.cpu_time_total / 1e3) for e in events
             if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                          "cudaEventSynchronize", "cudaMemcpyAsync")}
    host = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: -e.self_cpu_time_total)[:15]
    return {
        "wall_ms_per_step": round(wall_s * 1e3 / steps, 1),
        "gpu_kernel_ms_per_step": round(gpu_us / 1e3 / steps, 1),
        "kernel_launches_per_step": launches // steps,
        "syncs_per_step": {k: {"count": c // steps, "cpu_ms": round(ms / steps, 1)} for k, (c, ms) in syncs.items()},
        "top_host_ops": [{"op": e.key[:80], "count": e.count // steps, "self_cpu_ms": round(e.self_cpu_time_total / 1e3 / steps, 1)}
                         for e in host],
    }


def worker_eval(spec: dict) -> None:
    """Generated tokens/s at each batch size, `min_new_tokens = max_new_tokens` so every row generates
    the full length (random weights emit EOS at random). A short warm-up with the same shapes first."""
    import torch

    from medcot.cli import setup_logging
    from medcot.config import load_config
    from medcot.modeling import plan_eval_model, select_backend

    setup_logging()
    variant = spec["variant"]
    backend = "unsloth" if variant.startswith("unsloth") else "transformers"
    weights = "4bit" if "4bit" in variant else "16bit"
    # The baseline is plain transformers: its SDPA copies the KV cache to every query head (medcot.attention).
    attention = "sdpa" if variant.endswith("-sdpa") or variant == "transformers-4bit" else "auto"
    config = load_config(None, _base_overrides({**spec, "backend": backend})
                         + [f"eval.weights={weights}", f"eval.attention={attention}"])
    model_config, _ = plan_eval_model(config)  # what jobs/evaluate.py does before it picks the backend
    runtime = select_backend(model_config)  # imports Unsloth, when chosen, before transformers
    from transformers import StoppingCriteria, StoppingCriteriaList

    from medcot.evaluate import generate
    from medcot.modeling import load_with_adapter
    from medcot.prompts import inference_prompt

    t0 = time.monotonic()
    adapter = Path(spec["adapter"]) if spec.get("adapter") else None
    model, tokenizer = load_with_adapter(config, runtime, adapter)  # 16-bit: adapter merged, static KV cache
    out: dict[str, Any] = {"variant": variant, "backend": runtime.backend, "adapter": str(adapter) if adapter else None,
                           "attention": None if runtime.backend == "unsloth" else model.config._attn_implementation,
                           "load_s": round(time.monotonic() - t0, 1), "batches": []}

    class StopAfter(StoppingCriteria):
        def __init__(self, n: int):
            self.n, self.calls = n, 0

        def __call__(self, input_ids, scores, **kwargs):
            self.calls += 1
            return self.calls >= self.n

    rng = random.Random(0)
    n_words = spec["arch"]["vocab_size"] - N_SPECIAL
    new_tokens = spec["new_tokens"]
    for batch in spec["batches"]:
        # Questions of 40 to 120 words: prompts of unequal length, left-padded as the evaluate job does.
        prompts = [inference_prompt(" ".join(f"w{rng.randrange(n_words - 200)}" for _ in range(rng.randint(40, 120))))
                   for _ in range(batch)]
        entry: dict[str, Any] = {"batch": batch, "new_tokens": new_tokens}
        try:
            tokenizer.padding_side = "left"
            enc = tokenizer(sorted(prompts, key=len, reverse=True), return_tensors="pt", padding=True).to(model.device)
            warm = time.monotonic()
            with torch.inference_mode():
                model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id, stopping_criteria=StoppingCriteriaList([StopAfter(16)]))
            entry["warmup_s"] = round(time.monotonic() - warm, 1)
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            rows, seconds = generate(model, tokenizer, prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     batch_size=batch)
            generated = sum(r["generated_tokens"] for r in rows)
            entry.update(seconds=round(seconds, 2), generated_tokens=generated, tokens_per_s=round(generated / seconds, 1),
                         peak_memory_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
                         prompt_tokens=[min(r["prompt_tokens"] for r in rows), max(r["prompt_tokens"] for r in rows)])
        except torch.cuda.OutOfMemoryError:
            entry["error"] = "CUDA out of memory"
            torch.cuda.empty_cache()
        out["batches"].append(entry)
        _write(spec["result"], out)


WORKERS = {"peak": worker_peak, "build": worker_build, "train": worker_train, "eval": worker_eval}


# ---- the reference workload: the train job itself ---------------------------------------------------

def reference_rows(tokenizer, n: int, seed: int = 0) -> list[dict[str, str]]:
    """Rows in the dataset's columns whose training text (template + EOS) is exactly the drawn token length."""
    from medcot.data import Example, tokenize_example

    rng = random.Random(seed)
    n_words = len(tokenizer) - N_SPECIAL

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(n_words - 200)}" for _ in range(k))

    rows = []
    for _ in range(n):
        target = int(min(REF_MAX, max(REF_MIN, round(rng.lognormvariate(math.log(REF_MEDIAN), REF_SIGMA)))))
        question, response = words(rng.randint(20, 60)), words(rng.randint(20, min(160, target // 4)))
        overhead = len(tokenize_example(Example(question, "w0", response, 0), tokenizer)["input_ids"]) - 1
        cot = words(target - overhead)
        assert len(tokenize_example(Example(question, cot, response, 0), tokenizer)["input_ids"]) == target
        rows.append({"Question": question, "Complex_CoT": cot, "Response": response, "tokens": target})
    return rows


def run_reference(args, model_dir: Path, work: Path, variant: str, deadline: float, log) -> dict[str, Any]:
    """`jobs/train.py --config FILE` on the recipe's config with the synthetic rows; wall time from the
    command's start to its exit (import, data preparation, model load, 60 steps, checkpoints, adapter save)."""
    import yaml
    from transformers import AutoTokenizer

    micro, accum, gc, training_keys = _parse_ref_variant(variant)
    n_rows = 40 if args.tiny else 500
    data = work / f"reference-{n_rows}.jsonl"
    if not data.is_file():
        rows = reference_rows(AutoTokenizer.from_pretrained(model_dir), n_rows)
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lengths = [json.loads(line)["tokens"] for line in data.read_text().splitlines()]
    config = yaml.safe_load((ROOT / "configs" / "deepseek-r1-distill-llama-8b-medical.yaml").read_text())
    config.update(run_name=f"reference-{variant.replace(':', '-')}", output_dir=str(work / "reference"))
    config["model"].update(name=str(model_dir))
    config["data"].update(path=str(data), name=None, train_rows=n_rows, heldout_rows=0)
    config["lora"]["use_gradient_checkpointing"] = gc
    config["training"].update(training_keys)
    config["training"].update(per_device_train_batch_size=micro, gradient_accumulation_steps=accum, logging_steps=1)
    if args.tiny:
        config["training"].update(max_steps=6, save_steps=3)
    config["tracking"]["report_to"] = "none"
    cfg_path = work / f"reference-{variant.replace(':', '-')}.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_dir = Path(config["output_dir"]) / config["run_name"]
    shutil.rmtree(run_dir, ignore_errors=True)  # each variant trains from scratch, never resumes

    entry: dict[str, Any] = {"variant": variant, "micro_batch": micro, "accumulation": accum, "gc": gc, "training": training_keys,
                             "rows": n_rows, "row_tokens": {"mean": round(statistics.mean(lengths)),
                                                            "median": statistics.median(lengths), "max": max(lengths)}}
    t0 = time.monotonic()
    rc = _run([sys.executable, str(ROOT / "jobs" / "train.py"), "--config", str(cfg_path)], deadline, log, f"reference {variant}")
    entry["wall_s"] = round(time.monotonic() - t0, 1)
    entry["exit_code"] = rc
    summary_path = run_dir / "train" / "summary.json"
    if rc == 0 and summary_path.is_file():
        s = json.loads(summary_path.read_text())
        entry.update(model_load_s=s.get("model_load_s"), train_s=s["train_runtime_s"], train_tokens=s["train_tokens"],
                     tokens_per_s=s["train_tokens_per_s"], peak_memory_gib=s["peak_memory_gib"], steps=s["global_step"],
                     losses=[x["loss"] for x in s["losses"]], adapter=str(run_dir / "train" / "adapter"),
                     checkpointing=s.get("gradient_checkpointing"))
    return entry


REF_FLAGS: dict[str, dict[str, Any]] = {
    "padded": {"padding_free": False}, "padding_free": {"padding_free": True},
    "rebalance": {"sampling": "batch_rebalance"}, "grouped": {"sampling": "group_by_length"},
}


def _parse_ref_variant(variant: str) -> tuple[int, int, Any, dict[str, Any]]:
    """'8x1:true:padded:rebalance' -> micro-batch 8, accumulation 1, use_gradient_checkpointing True, and the
    training keys of the flags: padded / padding_free (training.padding_free), rebalance / grouped
    (training.sampling: batch_rebalance / group_by_length)."""
    parts = variant.split(":")
    micro, accum = (int(x) for x in parts[0].split("x"))
    gc = parts[1] if len(parts) > 1 else "unsloth"
    gc_value: Any = {"true": True, "false": False}.get(gc, gc)
    keys: dict[str, Any] = {}
    for flag in parts[2:]:
        keys.update(REF_FLAGS[flag])
    return micro, accum, gc_value, keys


# ---- orchestration ------------------------------------------------------------------------------------

def _run(cmd: list[str], deadline: float, log, label: str, cap_s: float | None = None,
         extra_env: dict[str, str] | None = None) -> int | str:
    """Run a command with its output appended to the log; stop it at the deadline (or its own cap)."""
    left = deadline - time.monotonic()
    timeout = min(left, cap_s) if cap_s else left
    if timeout < 20:
        log.write(f"\n=== {label}: skipped, {left:.0f} s left before the deadline\n")
        log.flush()
        return "skipped"
    log.write(f"\n=== {label}: {' '.join(cmd[-4:])[:300]} (limit {timeout:.0f} s)\n")
    log.flush()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=timeout)
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired:
        rc = f"timed out after {timeout:.0f} s"
    log.write(f"=== {label}: exit {rc} after {time.monotonic() - t0:.0f} s\n")
    log.flush()
    print(f"{label}: exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)
    return rc


def run_worker(kind: str, spec: dict, work: Path, deadline: float, log, label: str, cap_s: float | None = None) -> dict:
    result = work / f"result-{label.replace(' ', '-').replace(':', '-')}.json"
    result.unlink(missing_ok=True)
    spec = {**spec, "result": str(result)}
    rc = _run([sys.executable, __file__, "--worker", kind, "--spec", json.dumps(spec)], deadline, log, label, cap_s,
              spec.get("env"))
    data = json.loads(result.read_text()) if result.is_file() else {}
    if rc != 0:
        data["exit"] = rc
    return data


def lock_differences() -> dict[str, dict[str, str | None]]:
    """Packages of docker/requirements.lock (the image's pins) installed here at another version, or not at all:
    {name: {"lock": version, "installed": version or None}}. What these numbers ran on beyond the image."""
    from importlib.metadata import PackageNotFoundError, version

    lock = re.findall(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / "docker" / "requirements.lock").read_text(), re.M)
    found: dict[str, dict[str, str | None]] = {}
    for name, pinned in lock:
        try:
            installed: str | None = version(name)
        except PackageNotFoundError:
            installed = None
        # A local build tag (torch's "+cu130") names how the same version was built.
        if installed is None or installed.split("+")[0] != pinned:
            found[name] = {"lock": pinned, "installed": installed}
    return found


def environment() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    info: dict[str, Any] = {"date": dt.date.today().isoformat(), "python": platform.python_version(), "versions": {},
                            "lock_differences": lock_differences()}
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "accelerate", "datasets", "triton"):
        with contextlib.suppress(PackageNotFoundError):
            info["versions"][pkg] = version(pkg)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.strip().splitlines()[0]
        info["gpu"], info["driver"], info["gpu_memory"] = (x.strip() for x in smi.split(","))
    except (OSError, subprocess.CalledProcessError, IndexError):
        info["gpu"] = "unknown"
    return info


def merge_results(parts: list[dict]) -> dict:
    """Results of several runs (e.g. one per device call): later runs replace the same measurement."""
    merged: dict[str, Any] = {"meta": {}, "peak": {}, "build": {}, "train": {}, "reference": {}, "eval": {}}
    for part in parts:
        merged["meta"] = {**merged["meta"], **part.get("meta", {})}
        merged["peak"] = part.get("peak") or merged["peak"]
        if part.get("build") and not (part["build"].get("reused") and merged["build"]):  # keep the timed build
            merged["build"] = part["build"]
        for key in ("train", "reference", "eval"):
            merged[key].update(part.get(key, {}))
    return merged


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="peak,build,train,levers,reference,eval",
                        help="comma-separated, run in this order: peak, build, train, levers, reference, eval")
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
    parser.add_argument("--reference", default="2x4:auto,2x4:unsloth,8x1:unsloth,8x1:unsloth:grouped,8x1:false:grouped",
                        help="reference-workload variants MICROxACCUM:CHECKPOINTING[:FLAG...], checkpointing auto, unsloth, true "
                             "or false; "
                             "flags padded, padding_free, rebalance, grouped")
    parser.add_argument("--eval", default="transformers-16bit-static,transformers-16bit-static:256,transformers-16bit-static-sdpa,"
                                          "transformers-4bit,unsloth-4bit:256",
                        help="generation variants: unsloth-4bit, transformers-4bit, transformers-16bit-static (-sdpa: "
                             "eval.attention=sdpa), each with an optional :NEW_TOKENS")
    parser.add_argument("--eval-batches", default="1,8,32")
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
        results = merge_results([json.loads(Path(p).read_text()) for p in args.render])
        write_benchmarks_md(Path(args.benchmarks_md), results)
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
    results: dict[str, Any] = {"meta": meta, "peak": {}, "build": {}, "train": {}, "reference": {}, "eval": {}}
    if path.is_file():  # a second run on the same day and GPU adds to the first
        results = merge_results([json.loads(path.read_text()), {"meta": meta}])

    def save() -> None:
        path.write_text(json.dumps(results, indent=2))
        write_benchmarks_md(Path(args.benchmarks_md), results)

    common = {"model_dir": str(model_dir), "work": str(work), "arch": arch}
    log_path = Path(args.log) if args.log else work / "bench.log"
    with log_path.open("a") as log:
        for section in args.sections.split(","):
            if section == "peak":
                results["peak"] = run_worker("peak", common, work, deadline, log, "peak", cap_s=120)
            elif section == "build":
                results["build"] = run_worker("build", common, work, deadline, log, "build", cap_s=600)
            elif section in ("train", "levers"):
                runs = args.train_runs if section == "train" else args.lever_runs
                for key in runs.split(","):
                    key, _, only = key.partition("@")  # "unsloth:unsloth:auto@2x2048" measures that shape alone
                    backend, gc, layout = (key.split(":") + ["default"])[:3]
                    shapes = TRAIN_SHAPES  # a shape that does not fit (no checkpointing, small GPU) records its OOM
                    if only:
                        shapes = [tuple(int(x) for x in shape.split("x")) for shape in only.split("+")]
                    spec = {**common, "backend": backend, "gc": gc, "shapes": shapes,
                            "steps": args.steps if backend == "unsloth" else args.baseline_steps,
                            "warmup_steps": args.warmup_steps, "layout": layout,
                            "profile": args.profile}
                    results["train"][f"{backend}:{gc}:{layout}"] = run_worker("train", spec, work, deadline, log, f"train {key}",
                                                                            cap_s=480)
                    save()
            elif section == "reference":
                for variant in args.reference.split(","):
                    results["reference"][variant] = run_reference(args, model_dir, work, variant, deadline, log)
                    save()
            elif section == "eval":
                # A reference run's trained adapter, when this work folder has one: the evaluate job's "after" case.
                adapters = sorted((work / "reference").glob("reference-*/train/adapter"))
                adapter = str(adapters[0]) if adapters else None
                for variant in args.eval.split(","):
                    variant, _, tokens_text = variant.partition(":")  # "unsloth-4bit:256": its own answer length
                    tokens = int(tokens_text) if tokens_text else (
                        args.baseline_new_tokens if variant == "transformers-4bit" else args.new_tokens)
                    spec = {**common, "variant": variant, "batches": [int(b) for b in args.eval_batches.split(",")],
                            "new_tokens": tokens, "adapter": adapter}
                    results["eval"][f"{variant}:{tokens}"] = run_worker("eval", spec, work, deadline, log, f"eval {variant}",
                                                                        cap_s=600)
                    save()
            else:
                parser.error(f"unknown section {section!r}")
            save()
    print(f"results: {path}; log: {log_path}\n")
    print(render(results))
    return 0


# ---- the report ---------------------------------------------------------------------------------------

NOTES_HEADING = "## Notes"


def write_benchmarks_md(path: Path, results: dict) -> None:
    """The tables from the results; a hand-written `## Notes` section already in the file is kept."""
    notes = ""
    if path.is_file() and NOTES_HEADING in path.read_text():
        notes = "\n" + path.read_text()[path.read_text().index(NOTES_HEADING):]
    path.write_text(render(results) + notes)


def _shape(results: dict, key: str, batch: int, seq: int) -> dict:
    for entry in results["train"].get(key, {}).get("shapes", []):
        if entry["batch"] == batch and entry["seq_len"] == seq:
            return entry
    return {}


def _fmt(value: Any, spec: str = ",.0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:{spec}}{unit}"


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("**pass**" if ok else "**miss**")


def render(results: dict) -> str:
    meta, peak = results["meta"], results.get("peak", {}).get("matmul_bf16_tflops")
    v = meta.get("versions", {})
    lines = [
        "# Benchmarks",
        "",
        "Measured by `python3 bench/run.py` (`make bench`) on a Llama-3.1-8B-shaped model with random bf16 weights "
        "(the architecture of DeepSeek-R1-Distill-Llama-8B), through medcot's own train and evaluate code. "
        "See bench/README.md for what each number is and how it is counted. Targets are issue 5's.",
        "",
        f"- GPU: {meta.get('gpu')} ({meta.get('gpu_memory', '?')}), driver {meta.get('driver', '?')}; date {meta.get('date')}",
        f"- torch {v.get('torch')}, transformers {v.get('transformers')}, trl {v.get('trl')}, peft {v.get('peft')}, "
        f"bitsandbytes {v.get('bitsandbytes')}, unsloth {v.get('unsloth')} (zoo {v.get('unsloth_zoo')}), triton {v.get('triton')}, "
        f"Python {meta.get('python')}",
        f"- bf16 matmul peak of this GPU (8192^3, median): {_fmt(peak, ',.0f', ' TFLOP/s')}",
    ]
    if "lock_differences" in meta:  # results from before the lock have no such record
        differences = ", ".join(f"{name} {d['installed'] or 'missing'} (lock {d['lock']})"
                                for name, d in sorted(meta["lock_differences"].items()))
        lines.append(f"- installed versus the image's lock (docker/requirements.lock): {differences or 'the same'}")
    if meta.get("tiny"):
        lines.append("- **--tiny run: a 2-layer model; these numbers check the benchmark, not the GPU.**")
    build = results.get("build", {})
    if build and not build.get("reused"):
        lines.append(f"- model build: {_fmt(build.get('params', 0) / 1e9, '.2f')} B parameters, built on the GPU in "
                     f"{build.get('build_s')} s, saved ({_fmt(build.get('bytes', 0) / 1e9, '.1f')} GB safetensors) in {build.get('save_s')} s")

    def mfu(entry: dict) -> float | None:
        if not entry.get("tokens_per_s") or not peak:
            return None
        return entry["tokens_per_s"] * entry["flops_per_token"] / (peak * 1e12)

    lines += ["", "## Training (4-bit NF4 base, LoRA r 16 on all 7 projections, 8-bit AdamW, bf16)", "",
              "`run_training` on rows of exactly batch x length tokens; tokens/s over the timed steps that follow the "
              "warm-up steps (no compilation, start-up or checkpoint inside). MFU: model FLOPs (bench/README.md) over the "
              "matmul peak above.", "",
              "| path | checkpointing | batch x length | timed steps | tokens/s | peak GPU memory | MFU | model load |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, run in results["train"].items():
        backend, gc, *layout = key.split(":")
        gc = {"unsloth": "unsloth (offloaded)" if backend == "unsloth" else "plain", "true": "plain", "false": "none"}[gc]
        # Results of session 1 had no layout in the key: Unsloth chose (padding-free), or padded by env variable.
        layout = (layout or ["padded" if run.get("env") else "auto"])[0]
        if backend == "unsloth":
            backend += {"padded": ", padded batches", "padding_free": ", padding-free", "default": ", medcot default",
                        "auto": ", Unsloth's choice (padding-free)"}[layout]
        for entry in run.get("shapes", []):
            lines.append(f"| {backend} | {gc} | {entry['batch']}x{entry['seq_len']} | {entry.get('steps', '—')} | "
                         f"{_fmt(entry.get('tokens_per_s')) if 'error' not in entry else entry['error']} | "
                         f"{_fmt(entry.get('peak_memory_gib'), '.1f', ' GiB')} | {_fmt(mfu(entry), '.1%')} | {run.get('load_s', '—')} s |")
        if run.get("exit") not in (None, 0):
            lines.append(f"| {backend} | {gc} | (worker exit: {run['exit']}) | | | | | |")

    lines += ["", "## Reference workload (the train job: 500 rows, 60 steps; wall time includes import and load)", "",
              "| micro-batch x accumulation | checkpointing | wall | model load | train | tokens/s | peak GPU memory | final loss |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for e in results["reference"].values():
        losses = e.get("losses") or [None]
        flags = e.get("training") or ({"padding_free": False} if e.get("env") else {})
        padded = "".join([", padded batches" if flags.get("padding_free") is False else "",
                          ", padding-free" if flags.get("padding_free") else "",
                          f", {flags['sampling']} sampling" if flags.get("sampling") else ""])
        gc = checkpointing_name(e["gc"])
        if e["gc"] == "auto" and "checkpointing" in e:
            gc = f"auto: {checkpointing_name(e['checkpointing'])}"
        lines.append(f"| {e['micro_batch']}x{e['accumulation']}{padded} | {gc} | {_fmt(e.get('wall_s'), '.1f', ' s')} | "
                     f"{_fmt(e.get('model_load_s'), '.1f', ' s')} | {_fmt(e.get('train_s'), '.1f', ' s')} | "
                     f"{_fmt(e.get('tokens_per_s'))} | {_fmt(e.get('peak_memory_gib'), '.1f', ' GiB')} | {_fmt(losses[-1], '.4f')} |")
    ref_loss = _loss_agreement(results["reference"])
    if ref_loss:
        lines.append(f"\n{ref_loss}")

    adapters = {run.get("adapter") for run in results["eval"].values()}
    lines += ["", "## Generation (evaluate job's `generate`, greedy, every row generates the full length)", "",
              "Prompts of 133 to 211 tokens, left-padded; tokens/s = generated tokens / time of the `generate` call, "
              "after a 16-token warm-up with the same shapes. "
              + ("With the reference run's trained adapter (unmerged LoRA on the 4-bit paths, merged into the bf16 "
                 "weights for transformers-16bit-static)." if adapters - {None} else "Base model, no adapter."), "",
              "| variant | batch | new tokens per row | generated tokens/s | peak GPU memory | model load |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, run in results["eval"].items():
        variant = key.partition(":")[0]
        if run.get("attention") == GQA_DECODE:
            variant += " (grouped-query decoding)"
        for e in run.get("batches", []):
            lines.append(f"| {variant} | {e['batch']} | {e['new_tokens']} | "
                         f"{_fmt(e.get('tokens_per_s'), ',.1f') if 'error' not in e else e['error']} | "
                         f"{_fmt(e.get('peak_memory_gib'), '.1f', ' GiB')} | {run.get('load_s', '—')} s |")
        if run.get("exit") not in (None, 0):
            lines.append(f"| {variant} | (worker exit: {run['exit']}) | | | | |")

    lines += ["", "## Issue 5's targets", "", "| target | measured | verdict |", "| --- | --- | --- |"]
    for name, measured, ok in _targets(results, mfu):
        lines.append(f"| {name} | {measured} | {_verdict(ok)} |")
    return "\n".join(lines) + "\n"


def _loss_agreement(reference: dict) -> str | None:
    # Only runs that draw the same rows in the same order compare step by step (not other sampling strategies).
    runs = [(k, e["losses"]) for k, e in reference.items()
            if e.get("losses") and not (e.get("training") or {}).get("sampling")]
    if len(runs) < 2:
        return None
    (k0, base), parts = runs[0], []
    for key, losses in runs[1:]:
        n = min(len(base), len(losses))
        worst = max(abs(a - b) for a, b in zip(base[:n], losses[:n], strict=True))
        parts.append(f"{key} vs {k0}: largest per-step loss difference {worst:.4f} over {n} steps")
    return "Same rows in the same order, same global batch: " + "; ".join(parts) + "."


def _targets(results: dict, mfu) -> list[tuple[str, str, bool | None]]:
    t = TARGETS
    # The fastest Unsloth run at 2x2048 that keeps the memory target (the recipe must fit a 12 GB card).
    unsloth_runs = {k: _shape(results, k, 2, 2048) for k in results["train"] if k.startswith("unsloth")}
    fitting = {k: e for k, e in unsloth_runs.items() if e.get("tokens_per_s") and e.get("peak_memory_gib", 99) <= t["unsloth_2x2048_peak_gib"]}
    pool = fitting or {k: e for k, e in unsloth_runs.items() if e.get("tokens_per_s")}
    best_key = max(pool, key=lambda k: pool[k]["tokens_per_s"]) if pool else None
    uns = pool.get(best_key, {}) if best_key else {}
    base = next((_shape(results, k, 2, 2048) for k in results["train"] if k.startswith("transformers")), {})
    label = f" ({best_key})" if best_key else ""
    out: list[tuple[str, str, bool | None]] = []
    tps = uns.get("tokens_per_s")
    out.append((f"train, Unsloth 2x2048 >= {t['unsloth_2x2048_tokens_per_s']:,} tokens/s", _fmt(tps) + label,
                None if tps is None else tps >= t["unsloth_2x2048_tokens_per_s"]))
    ratio = tps / base["tokens_per_s"] if tps and base.get("tokens_per_s") else None
    out.append((f"train, Unsloth >= {t['unsloth_vs_transformers_2x2048']}x transformers at 2x2048", _fmt(ratio, '.2f', 'x'),
                None if ratio is None else ratio >= t["unsloth_vs_transformers_2x2048"]))
    mem = uns.get("peak_memory_gib")
    out.append((f"train, Unsloth 2x2048 peak <= {t['unsloth_2x2048_peak_gib']:.0f} GiB", _fmt(mem, '.1f', ' GiB') + label,
                None if mem is None else mem <= t["unsloth_2x2048_peak_gib"]))
    mfus = {k: mfu(_shape(results, k, 8, 2048)) for k in results["train"] if k.startswith("unsloth")}
    mfus = {k: m for k, m in mfus.items() if m is not None}
    if mfus:
        best = max(mfus, key=mfus.get)
        shown = ", ".join(f"{m:.1%} ({k})" for k, m in mfus.items())
        out.append((f"train, 8x2048 >= {t['mfu_8x2048']:.0%} MFU", shown, mfus[best] >= t["mfu_8x2048"]))
    else:
        out.append((f"train, 8x2048 >= {t['mfu_8x2048']:.0%} MFU", "—", None))
    walls = {k: e["wall_s"] for k, e in results["reference"].items() if e.get("exit_code") == 0}
    if walls:
        shown = ", ".join(f"{w:.0f} s ({k})" for k, w in walls.items())
        out.append((f"reference workload <= {t['reference_wall_s']} s wall incl. load", shown, min(walls.values()) <= t["reference_wall_s"]))
    else:
        out.append((f"reference workload <= {t['reference_wall_s']} s wall incl. load", "—", None))

    def rate(key: str, batch: int) -> float | None:
        for e in results["eval"].get(key, {}).get("batches", []):
            if e["batch"] == batch:
                return e.get("tokens_per_s")
        return None

    def tokens(key: str) -> int | None:
        return next((e.get("new_tokens") for e in results["eval"][key].get("batches", [])), None)

    # Keys are VARIANT:NEW_TOKENS. The verdict counts answers of the evaluate job's length (1,200 new tokens)
    # where such a run exists; shorter runs are listed beside it.
    fast = [k for k in results["eval"] if not k.startswith("transformers-4bit")]
    judged = [k for k in fast if tokens(k) == 1200] or fast
    for batch, key in ((32, "eval_b32_tokens_per_s"), (1, "eval_b1_tokens_per_s")):
        rates = {k: rate(k, batch) for k in fast if rate(k, batch)}
        scored = {k: r for k, r in rates.items() if k in judged}
        out.append((f"eval, batch {batch} >= {t[key]:,} tokens/s",
                    ", ".join(f"{r:,.0f} ({k.partition(':')[0]}, {tokens(k)} new tokens)" for k, r in rates.items()) or "—",
                    None if not scored else max(scored.values()) >= t[key]))
    ratios = []
    for batch in (1, 8, 32):
        baseline = next((rate(k, batch) for k in results["eval"] if k.startswith("transformers-4bit") and rate(k, batch)), None)
        rates = [rate(k, batch) for k in judged if rate(k, batch)]
        if baseline and rates:
            ratios.append((batch, max(rates) / baseline))
    out.append((f"eval, best >= {t['eval_vs_transformers_4bit']:.0f}x transformers 4-bit at each batch",
                ", ".join(f"{r:.1f}x (batch {b})" for b, r in ratios) or "—",
                None if not ratios else min(r for _, r in ratios) >= t["eval_vs_transformers_4bit"]))
    return out


if __name__ == "__main__":
    sys.exit(main())
