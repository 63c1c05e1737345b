"""Supervised fine-tuning with TRL's SFTTrainer: tokenization and masking, checkpoints that survive
preemption, progress a person can read, and the summary the later stages and the report use.

Checkpoint rule: transformers resumes from the highest-numbered `checkpoint-*` folder even when its save
was cut off. We mark a checkpoint complete (`medcot-complete`) only after the trainer has written all of
it, resume only from marked ones, and delete unmarked ones before resuming. With a durable folder (medcot.durable),
each complete checkpoint is also committed there before training goes on, and a new machine resumes from the newest
one that verifies.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any, TypeVar

import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from medcot.config import RunConfig, save_config
from medcot.data import Example, data_inputs, prepare, tokenize_example
from medcot.durable import ENV, DurableError, Mirror
from medcot.modeling import (
    Runtime,
    add_lora,
    check_target_modules,
    checkpointing_name,
    load_model,
    load_tokenizer,
    resolve_checkpointing,
    resolve_model_path,
)
from medcot.progress import duration
from medcot.resources import resource_errors
from medcot.rundir import RunDir, StageError, write_json
from medcot.tracking import configure_wandb

log = logging.getLogger(__name__)

COMPLETE_MARK = "medcot-complete"
T = TypeVar("T")
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---- the set-up's heap ------------------------------------------------------------------------------

class SetupHeap:
    """`gc.freeze()` of what the imports left on the heap, for the train job's set-up (model load, LoRA, trainer).

    Unsloth's loader, its LoRA set-up and its tokenizer checks call `gc.collect()` about a dozen times; each pass
    walks every object the imports of torch, transformers, TRL and Unsloth made, 0.29 s a pass on an H200 machine
    (cProfile of the first train job: 4.1 s in all). Frozen objects are not walked. The heap is thawed before
    `train()`, where Unsloth freezes it again for the training loop (its own `_gc_train_scope`, which does nothing
    when something is already frozen), and after an error. Nothing frozen is freed meanwhile: garbage among it is
    collected after the thaw. MEDCOT_GC_FREEZE=0 turns it off (bench/README.md: measuring it).
    """

    frozen = False
    # Python 3.12's collector keeps immortal objects in the frozen generation (375 on one Python 3.12.3): those are
    # not someone else's freeze.
    startup = gc.get_freeze_count()

    @classmethod
    def freeze(cls) -> None:
        if os.environ.get("MEDCOT_GC_FREEZE", "1") != "0" and not cls.frozen and gc.get_freeze_count() <= cls.startup:
            gc.freeze()
            cls.frozen = True
            log.debug("gc: %d objects frozen for the set-up", gc.get_freeze_count())

    @classmethod
    def thaw(cls) -> None:
        if cls.frozen:
            gc.unfreeze()
            cls.frozen = False


# ---- data ------------------------------------------------------------------------------------------

def build_dataset(examples: list[Example], tokenizer, template: str = "recipe") -> Dataset:
    return Dataset.from_list([tokenize_example(ex, tokenizer, template) for ex in examples])


# ---- checkpoints -----------------------------------------------------------------------------------

def complete_checkpoints(folder: Path) -> list[Path]:
    """Marked checkpoints, oldest first."""
    found = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        m = _CHECKPOINT_RE.match(path.name)
        if m and (path / COMPLETE_MARK).is_file():
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def discard_incomplete_checkpoints(folder: Path) -> list[Path]:
    """Remove checkpoint folders whose save never finished, so nothing resumes from them."""
    removed = []
    for path in folder.glob("checkpoint-*") if folder.is_dir() else []:
        if path.is_dir() and not (path / COMPLETE_MARK).is_file():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def checkpoint_step(path: Path) -> int:
    return int(_CHECKPOINT_RE.match(path.name).group(1))


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the trainer has finished writing it (on_save runs after), then commits it to
    the durable folder, if any, before training goes on: a preemption loses at most the steps since this save."""

    def __init__(self, mirror: Mirror | None = None, config_hash: str = "", keep: int | None = None) -> None:
        self.mirror, self.config_hash, self.keep = mirror, config_hash, keep
        self.durable_s = 0.0

    def on_save(self, args, state, control, **kwargs):
        # Every rank writes its own RNG state into the folder; without this wait, rank 0 could mark (and copy) the
        # folder before the others' files are in it.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if path.is_dir() and state.is_world_process_zero:
            (path / COMPLETE_MARK).write_text(f"{state.global_step}\n")
            if self.mirror is not None:
                t0 = time.monotonic()
                self.mirror.commit(f"checkpoints/{path.name}", path, extra={"config_hash": self.config_hash},
                                   skip=[COMPLETE_MARK])
                prune_durable_checkpoints(self.mirror, self.config_hash, self.keep)
                self.durable_s += time.monotonic() - t0
        return control


def prune_durable_checkpoints(mirror: Mirror, config_hash: str, keep: int | None) -> None:
    """Keep the `keep` newest committed checkpoints of this config in the durable folder (all when None), as
    save_total_limit does on disk; those of another config (a --force restart) go."""
    ours = 0
    for step, commit in mirror.checkpoints():
        if commit.extra.get("config_hash") == config_hash:
            ours += 1
            if keep is None or ours <= keep:
                continue
        mirror.withdraw(f"checkpoints/checkpoint-{step}")


def restore_durable_checkpoint(mirror: Mirror, folder: Path, config_hash: str) -> Path | None:
    """Bring the newest committed checkpoint of this config that is newer than any complete one here, verified, and
    mark it complete. Returns its folder, or None when the durable folder has nothing newer."""
    for leftover in folder.glob(".restore-checkpoint-*"):  # a restore cut off on this machine before
        shutil.rmtree(leftover, ignore_errors=True)
    local = complete_checkpoints(folder)
    newest_here = checkpoint_step(local[-1]) if local else -1
    for step, commit in mirror.checkpoints():
        if step <= newest_here:
            break
        if commit.extra.get("config_hash") != config_hash:
            log.info("durable: checkpoint-%d is of another config; not resumed from", step)
            continue
        tmp = folder / f".restore-checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        if mirror.restore(f"checkpoints/checkpoint-{step}", tmp, commit) is None:
            continue
        (tmp / COMPLETE_MARK).write_text(f"{step}\n")
        final = folder / f"checkpoint-{step}"
        shutil.rmtree(final, ignore_errors=True)  # an unmarked leftover of the same step
        os.replace(tmp, final)
        return final
    return None


class GracefulStop(TrainerCallback):
    """On SIGTERM/SIGINT (spot preemption, `docker stop`, Ctrl-C): finish the current step, save a
    checkpoint, stop. The job then exits non-zero and says how to resume."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:  # a second signal: the user insists
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after the current step, then stopping", self.signal_name)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal_name is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


class ProgressLog(TrainerCallback):
    """One line per logging step: loss, learning rate, tokens/s, memory, ETA. Keeps when each step ended, for the
    first step's extra time (compilation) in the summary."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.t0 = 0.0
        self.step0 = 0
        self.tokens0 = 0
        self.step_ends: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0, self.step0, self.tokens0 = time.monotonic(), state.global_step, state.num_input_tokens_seen
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.monotonic())
        return control

    def step_times(self) -> dict[str, float | None]:
        """first_step_s (from the start of training), median_step_s of the others: their difference is what the
        first step paid beyond a steady one (Unsloth's and Inductor's compilation, CUDA graph capture)."""
        if len(self.step_ends) < 3:
            return {"first_step_s": None, "median_step_s": None}
        gaps = sorted(b - a for a, b in pairwise(self.step_ends))
        return {"first_step_s": round(self.step_ends[0] - self.t0, 2), "median_step_s": round(gaps[len(gaps) // 2], 3)}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return control
        elapsed = time.monotonic() - self.t0
        steps = max(state.global_step - self.step0, 1)
        tokens_per_s = (state.num_input_tokens_seen - self.tokens0) / max(elapsed, 1e-9)
        eta = (state.max_steps - state.global_step) * elapsed / steps
        log.info(
            "step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  %s  eta %s",
            state.global_step, state.max_steps, logs["loss"], logs.get("learning_rate", 0.0),
            tokens_per_s, memory_text(self.device), duration(eta),
        )
        return control


def torch_compile_totals() -> tuple[float, int]:
    """(seconds, frames) torch.compile has spent in this process so far: Dynamo's tracing and Inductor's code
    generation of every frame it compiled, recompilations included (Unsloth's compiled blocks and loss); not Triton's
    first launch of a kernel, which torch does not count."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
    except ImportError:  # a torch without Dynamo's metrics: nothing to count
        return 0.0, 0
    times = compilation_time_metrics.get("_compile.compile_inner", [])
    return float(sum(times)), len(times)


def peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    # ru_maxrss is KiB on Linux: the process's peak resident memory.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_text(device: str) -> str:
    return f"peak {'GPU' if device == 'cuda' else 'RSS'} {peak_memory_gib(device):.1f} GiB"


# ---- trainer ---------------------------------------------------------------------------------------

def _precision(config: RunConfig, runtime: Runtime) -> dict[str, bool]:
    """training.precision resolved: autocast to the model's 16-bit compute dtype (the LoRA weights and the optimizer
    stay fp32). On CPU only bf16 autocasts; fp16 there would be emulated."""
    choice = config.training.precision
    if choice == "auto":
        choice = {"bfloat16": "bf16", "float16": "fp16"}.get(runtime.dtype_name, "fp32")
    if runtime.device != "cuda" and choice == "fp16":
        log.warning("training.precision=fp16 has no CPU kernels; training in fp32 on CPU")
        choice = "fp32"
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def _optimizer(name: str, runtime: Runtime) -> str:
    if runtime.device != "cuda" and ("8bit" in name or "bnb" in name):
        log.warning("training.optim=%s needs bitsandbytes on CUDA; using adamw_torch on CPU", name)
        return "adamw_torch"
    return name


def report_to(config: RunConfig) -> list[str]:
    return ["wandb"] if configure_wandb(config) else []


# Architectures whose padding-free batches medcot has checked on the Unsloth path (the loss curve against padded
# micro-batches, and rows that do not attend to each other: tests/test_gpu.py). Unsloth itself refuses padding-free
# for some others (Gemma 2, gpt-oss); for those not listed here medcot leaves the choice to Unsloth.
PADDING_FREE_CHECKED = frozenset({"llama"})


def _batch_layout(config: RunConfig, runtime: Runtime, model_type: str | None = None) -> dict[str, bool]:
    """training.padding_free, resolved: as set; else padding-free on the Unsloth path for the architectures above,
    Unsloth's own choice for the others, and padded (TRL's default) on the transformers path. With the reference
    rows (a log-normal spread of lengths, mean 1,000 tokens) padding-free won on an H200 at 8 rows a micro-batch,
    0.64 s a step against 0.78 s padded, although only padded batches let Unsloth compile its decoder blocks
    (BENCHMARKS.md, 2026-12-02); at rows of one length, where it saves nothing, it was 3-8% slower (H100)."""
    if config.training.padding_free is not None:
        return {"padding_free": config.training.padding_free}
    if runtime.backend != "unsloth":
        return {"padding_free": False}
    return {"padding_free": True} if model_type in PADDING_FREE_CHECKED else {}


def sft_config(config: RunConfig, runtime: Runtime, checkpoint_dir: Path, model_type: str | None = None) -> SFTConfig:
    t = config.training
    gc = config.lora.use_gradient_checkpointing
    layout = _batch_layout(config, runtime, model_type)
    return SFTConfig(
        output_dir=str(checkpoint_dir),
        run_name=config.run_name,
        per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        optim=_optimizer(t.optim, runtime),
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=report_to(config),
        # TRL's max_length defaults to 1024 and truncates silently; rows are already checked to fit (data.prepare
        # drops longer ones), so padding-free, where TRL refuses a max_length, loses nothing without it.
        max_length=None if layout.get("padding_free") else config.model.max_seq_length,
        packing=t.packing,
        completion_only_loss=t.loss_on == "response",
        # Rows arrive tokenized; worker processes for TRL's last pass over them cost seconds of start-up.
        # (Unsloth reads None as "size a pool for me" and 1 as in-process; plain TRL runs None in-process.)
        dataset_num_proc=1 if runtime.backend == "unsloth" else None,
        dataloader_num_workers=t.dataloader_num_workers,
        train_sampling_strategy=t.sampling,
        # Unsloth's own gradient checkpointing is set on the model by get_peft_model.
        gradient_checkpointing=bool(gc) and runtime.backend == "transformers",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        include_num_input_tokens_seen="non_padding",
        # TRL's default chunked loss recomputes the output head for the backward pass (its chunks are checkpointed) to
        # save a GPU's memory; a CPU has the memory, and the recompute cost 8% of a step (SmolLM2-135M, 2 x 490 tokens,
        # 17.4 s -> 16.0 s of CPU). On a GPU the chunks stay (Unsloth replaces the loss with its own).
        loss_type="nll" if runtime.device == "cpu" else None,
        # LoRA uses every adapter in every forward; searching for unused parameters only costs time.
        ddp_find_unused_parameters=False,
        use_cpu=runtime.device != "cuda",
        disable_tqdm=not sys.stderr.isatty(),
        save_only_model=False,
        **layout,
        **_precision(config, runtime),
    )


def build_trainer(config: RunConfig, runtime: Runtime, model, tokenizer, train_ds: Dataset,
                  checkpoint_dir: Path, callbacks: list[TrainerCallback]) -> SFTTrainer:
    if tokenizer.pad_token is None:
        # Padding positions are masked by the attention mask, not by token id, in TRL's collator, so the
        # EOS labels survive even when pad == EOS (checked in tests/test_training.py).
        tokenizer.pad_token = tokenizer.eos_token
    trainer = SFTTrainer(
        model=model,
        args=sft_config(config, runtime, checkpoint_dir, getattr(model.config, "model_type", None)),
        train_dataset=train_ds,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    # ProgressLog prints the same numbers with units and ETA; the trainer's raw dict printer is noise.
    trainer.remove_callback(PrinterCallback)
    return trainer


def resume_point(checkpoint_dir: Path) -> Path | None:
    """The last complete checkpoint, as rank 0 sees it. Every rank resumes from that one; a rank whose machine lacks
    it (a node that could not restore it) stops with the reason rather than train from another step."""
    complete = complete_checkpoints(checkpoint_dir)
    name = complete[-1].name if complete else None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        chosen = [name]
        torch.distributed.broadcast_object_list(chosen, src=0)
        name = chosen[0]
        if name is not None and not (checkpoint_dir / name / COMPLETE_MARK).is_file():
            raise DurableError(f"rank 0 resumes from {name}, which this node's {checkpoint_dir} lacks; each node "
                               f"restores it from the durable folder ({ENV}) before training: check that every node "
                               f"mounts the same bucket")
    return checkpoint_dir / name if name else None


def run_training(config: RunConfig, runtime: Runtime, model, tokenizer, train_ds: Dataset,
                 checkpoint_dir: Path, marker: CheckpointMarker | None = None) -> tuple[SFTTrainer, dict[str, Any], str | None]:
    """Train (resuming from the last complete checkpoint); returns trainer, summary and the stop signal if any."""
    resume = resume_point(checkpoint_dir)
    if resume:
        log.info("resuming from %s", resume)

    stop = GracefulStop()
    progress = ProgressLog(runtime.device)
    marker = marker or CheckpointMarker()
    t_setup = time.monotonic()
    trainer = build_trainer(config, runtime, model, tokenizer, train_ds, checkpoint_dir, [marker, progress, stop])
    setup_s = time.monotonic() - t_setup
    if runtime.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    SetupHeap.thaw()  # Unsloth's train() freezes the heap itself
    stop.install()
    compile0 = torch_compile_totals()
    t0 = time.monotonic()
    try:
        with resource_errors(config, "train", checkpoint_dir, lambda: _last_checkpoint_text(checkpoint_dir)):
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    finally:
        stop.uninstall()
    runtime_s = time.monotonic() - t0
    compile_s, compiled_frames = (now - before for now, before in zip(torch_compile_totals(), compile0, strict=True))
    state = trainer.state
    losses = [{"step": h["step"], "loss": h["loss"]} for h in state.log_history if "loss" in h]
    tokens = state.num_input_tokens_seen
    summary = {
        "backend": runtime.backend,
        "device": runtime.device,
        "dtype": runtime.dtype_name,
        "load_in_4bit": runtime.load_in_4bit,
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "resumed_from": resume.name if resume else None,
        "train_loss": result.training_loss if not math.isnan(result.training_loss) else None,
        "losses": losses,
        "log_history": [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in state.log_history],
        "trainer_setup_s": round(setup_s, 2),
        "train_runtime_s": round(runtime_s, 2),
        "train_tokens": int(tokens),
        "train_tokens_per_s": round(tokens / runtime_s, 1) if runtime_s > 0 else None,
        "peak_memory_gib": round(peak_memory_gib(runtime.device), 2),
        "peak_memory_kind": "cuda_max_allocated" if runtime.device == "cuda" else "process_max_rss",
        "global_batch_size": config.training.per_device_train_batch_size * config.training.gradient_accumulation_steps
        * trainer.args.world_size,
        "padding_free": bool(getattr(trainer.args, "padding_free", False)),  # the layout the trainer used
        **progress.step_times(),
        # torch's own count of its compilation during training (most of it in the first step, the rest where a new
        # shape recompiles a block): with first_step_s and median_step_s, what the first step's extra time was.
        "torch_compile_s": round(compile_s, 2),
        "torch_compiled_frames": compiled_frames,
        # Seconds the checkpoints' copies to the durable folder held training up (0 without one).
        "durable_copy_s": round(marker.durable_s, 2),
    }
    if summary["first_step_s"] is not None:
        log.info("first step %.1f s (torch compiled %d frames in %.1f s in all), then %.2f s a step",
                 summary["first_step_s"], compiled_frames, compile_s, summary["median_step_s"])
    return trainer, summary, stop.signal_name


def rank_zero_decides(decide: Callable[[], T]) -> T:
    """`decide()` run by rank 0 alone (a single process: by itself), its answer handed to every rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return decide()
    answer = [decide() if torch.distributed.get_rank() == 0 else None]
    torch.distributed.broadcast_object_list(answer, src=0)
    return answer[0]


def _last_checkpoint_text(checkpoint_dir: Path) -> str:
    done = complete_checkpoints(checkpoint_dir)
    if not done:
        return "No checkpoint was completed yet."
    return f"The last complete checkpoint, {done[-1].name}, is intact."


def save_adapter(model, tokenizer, folder: Path) -> None:
    """The LoRA adapter (adapter_config.json + adapter_model.safetensors) and the tokenizer."""
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    for leftover in folder.glob("README.md"):
        # peft writes a template model card that names no medcot provenance; the push job writes the real one.
        leftover.unlink()


# ---- the train stage -------------------------------------------------------------------------------

STAGE_SECTIONS = ("model", "data", "lora", "training")


def train_stage(config: RunConfig, runtime: Runtime, force: bool = False) -> int:
    """The train job: prepare data, load model + LoRA, train with resume, publish `train/` atomically."""
    started = time.monotonic()

    run = RunDir(config.run_dir)
    config_hash = config.section_hash(*STAGE_SECTIONS)
    inputs = data_inputs(config)
    # Under torchrun (make train GPUS=N, or several nodes) every rank runs this function; rank 0 alone writes the
    # run's files and durable copies, and decides for all whether the stage is already done.
    from accelerate import PartialState

    dist = PartialState(cpu=runtime.device != "cuda")
    if rank_zero_decides(lambda: run.check_done("train", config_hash, inputs, force)):
        log.info("train: already finished in %s with this config and data; nothing to do (delete the stage folder to redo it)", run.stage("train"))
        return 0
    check_target_modules(config)

    ckpt = run.checkpoints
    owner = ckpt / "config_hash"
    if ckpt.is_dir() and owner.is_file() and owner.read_text().strip() != config_hash and not force:
        raise StageError(
            f"{ckpt} holds checkpoints of a run with a different config; pass --force to discard them "
            f"and start over, or choose another run_name"
        )
    if dist.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
        save_config(config, run.root / "config.yaml")
        if ckpt.is_dir() and owner.is_file() and owner.read_text().strip() != config_hash:
            shutil.rmtree(ckpt)
        ckpt.mkdir(parents=True, exist_ok=True)
        owner.write_text(config_hash + "\n")
        for path in discard_incomplete_checkpoints(ckpt):
            log.warning("checkpoint %s was never completed (save cut off); removed", path.name)
    if run.mirror is not None and dist.is_local_main_process:  # each node's first process, for its own disk
        restore_durable_checkpoint(run.mirror, ckpt, config_hash)
    dist.wait_for_everyone()

    t_data = time.monotonic()
    tokenizer = load_tokenizer(resolve_model_path(config.model.name), config.model.revision)
    data = prepare(config.data, tokenizer, config.model.max_seq_length)
    data_s = time.monotonic() - t_data
    log.info("%s", data.report.summary())

    # Checkpointing changes memory and speed, not the result: the config hash (resume) keeps the value as written.
    train_config, why = resolve_checkpointing(config, runtime)
    checkpointing = train_config.lora.use_gradient_checkpointing
    log.info("gradient checkpointing: %s (%s)", checkpointing_name(checkpointing), why)

    t_load = time.monotonic()
    model, tokenizer = load_model(train_config, runtime, for_training=True)
    model = add_lora(model, train_config.lora, runtime, config.model.max_seq_length)
    load_s = time.monotonic() - t_load
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model loaded in %.1f s; %.2f M trainable LoRA parameters", load_s, trainable / 1e6)

    marker = CheckpointMarker(run.mirror, config_hash, config.training.save_total_limit)
    trainer, summary, stopped_by = run_training(train_config, runtime, model, tokenizer,
                                                build_dataset(data.train, tokenizer, config.data.template), ckpt, marker)
    summary.update(gradient_checkpointing=checkpointing, gradient_checkpointing_why=why)
    if stopped_by:
        done = complete_checkpoints(ckpt)
        log.error(
            "train: stopped by %s at step %d/%d; checkpoint %s saved. Rerun the same command to resume from it.",
            stopped_by, summary["global_step"], summary["max_steps"], done[-1].name if done else "(none)",
        )
        return 143 if stopped_by == "SIGTERM" else 130

    summary.update(data_s=round(data_s, 2), model_load_s=round(load_s, 2), trainable_params=trainable, data=data.report.to_dict(),
                   world_size=dist.num_processes)
    if dist.is_main_process:
        with run.publishing("train", config_hash, inputs, started=started) as (tmp, manifest):
            save_adapter(trainer.model, tokenizer, tmp / "adapter")
            write_json(tmp / "summary.json", summary)
            save_config(config, tmp / "config.yaml")
            manifest.extra = {"global_step": summary["global_step"], "train_loss": summary["train_loss"]}
    dist.wait_for_everyone()
    log.info(
        "train: done in %s (%d steps, %.0f tokens/s, %s); adapter in %s",
        duration(summary["train_runtime_s"]), summary["global_step"], summary["train_tokens_per_s"] or 0,
        memory_text(runtime.device), run.stage("train") / "adapter",
    )
    return 0
