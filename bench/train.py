"""The train and levers sections: tokens/s, peak memory and MFU of `medcot.training.run_training` per
backend, checkpointing and batch layout, at fixed batch x length shapes; optionally a torch.profiler summary."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from bench.common import Session, base_overrides, write_result
from bench.model import N_SPECIAL, train_flops_per_token

TRAIN_SHAPES = [(2, 1024), (2, 2048), (8, 2048)]
# training.padding_free per layout name: auto leaves it to Unsloth (padding-free on GPUs it has not measured).
# "default" leaves it unset: medcot's rule (padded on Hopper, Unsloth's own choice on older GPUs).
LAYOUTS: dict[str, bool | None] = {"default": None, "padded": False, "padding_free": True}


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
    base = base_overrides(spec) + [f"lora.use_gradient_checkpointing={spec['gc']}"]
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
        write_result(spec["result"], out)

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
        write_result(spec["result"], out)


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


def run_section(session: Session, name: str) -> None:
    """One worker per run of --train-runs (section train) or --lever-runs (section levers)."""
    args = session.args
    runs = args.train_runs if name == "train" else args.lever_runs
    for key in runs.split(","):
        key, _, only = key.partition("@")  # "unsloth:unsloth:auto@2x2048" measures that shape alone
        backend, gc, layout = (key.split(":") + ["default"])[:3]
        shapes = TRAIN_SHAPES  # a shape that does not fit (no checkpointing, small GPU) records its OOM
        if only:
            shapes = [tuple(int(x) for x in shape.split("x")) for shape in only.split("+")]
        spec = {**session.common, "backend": backend, "gc": gc, "shapes": shapes,
                "steps": args.steps if backend == "unsloth" else args.baseline_steps,
                "warmup_steps": args.warmup_steps, "layout": layout,
                "profile": args.profile}
        session.results["train"][f"{backend}:{gc}:{layout}"] = session.worker("train", spec, f"train {key}", cap_s=480)
        session.save()
