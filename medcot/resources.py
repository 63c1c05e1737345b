"""Running out of GPU memory or disk: errors that say what to change, and evaluation that retries smaller.

    with resource_errors(config, "train", checkpoint_dir):   # OOM / full disk -> ResourceError with the fix
        trainer.train()
    out = split_on_oom(fn, batch, pad_value=pad_id, state=SplitState())      # eval: halve the batch on OOM

A CUDA out-of-memory error names the config overrides that need less memory (a smaller micro-batch with
proportionally more accumulation keeps the global batch). A full disk names the folder and the last
complete checkpoint, which a failed save never touches.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medcot.rundir import StageError

if TYPE_CHECKING:
    import torch

    from medcot.config import RunConfig

log = logging.getLogger(__name__)

# torch's zip writer reports a full disk as "unexpected pos ..." with no errno, so a failed write is also
# called a full disk when the filesystem has less than this left.
LOW_DISK_BYTES = 64 << 20


class ResourceError(StageError):
    """The stage ran out of GPU memory or disk; the message lists what to change. A StageError, so every job
    reports it as a user error (one message, no traceback)."""


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    # bitsandbytes and some CUDA kernels raise a plain RuntimeError for the same condition.
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def free_bytes(folder: Path) -> int | None:
    for path in (folder, *folder.parents):
        if path.exists():
            return shutil.disk_usage(path).free
    return None


def is_disk_full(error: BaseException, folder: Path) -> bool:
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "os error 28" in text:  # safetensors (Rust) wraps the OSError
            return True
    free = free_bytes(folder)
    return isinstance(error, (OSError, RuntimeError)) and free is not None and free < LOW_DISK_BYTES


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def memory_fixes(config: RunConfig, stage: str) -> list[tuple[str, str]]:
    """(overrides, why) pairs that each need less memory for `stage` ("train" or "eval")."""
    fixes: list[tuple[str, str]] = []
    t, m = config.training, config.model
    if stage == "train":
        b, g = t.per_device_train_batch_size, t.gradient_accumulation_steps
        if b > 1:
            smaller = max(d for d in range(1, b // 2 + 1) if b % d == 0)
            fixes.append((f"training.per_device_train_batch_size={smaller} "
                          f"training.gradient_accumulation_steps={g * b // smaller}",
                          f"same global batch of {b * g} rows per device, in smaller micro-batches"))
        if config.lora.use_gradient_checkpointing in (False, "auto"):
            fixes.append(("lora.use_gradient_checkpointing=unsloth",
                          "recompute activations in the backward pass (offloaded to CPU memory on Unsloth)"))
    else:
        if config.eval.batch_size == "auto":
            fixes.append(("eval.batch_size=8", "a fixed batch instead of one sized to the free memory"))
        elif config.eval.batch_size > 1:
            fixes.append((f"eval.batch_size={config.eval.batch_size // 2}", "fewer prompts generated together"))
        if config.eval.max_new_tokens > 64:
            fixes.append((f"eval.max_new_tokens={config.eval.max_new_tokens // 2}",
                          "a shorter generation budget (a smaller KV cache)"))
    if m.max_seq_length > 128:
        fixes.append((f"model.max_seq_length={m.max_seq_length // 2}",
                      "shorter rows; longer ones are dropped, never cut (the data report counts them)"))
    if not m.load_in_4bit:
        fixes.append(("model.load_in_4bit=true", "4-bit base weights (QLoRA)"))
    return fixes


def oom_message(config: RunConfig, stage: str, error: BaseException, where: str = "") -> str:
    what = {"train": "training", "eval": "evaluation"}.get(stage, stage)
    lines = [f"CUDA out of memory during {what}{where} ({_first_line(error)})."]
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        lines.append(f"Peak allocated {_size(torch.cuda.max_memory_allocated())} of the GPU's {_size(total)}.")
    fixes = memory_fixes(config, stage)
    if fixes:
        again = ("rerun with --force and" if stage == "train" else "rerun with")
        lines.append(f"Each of these needs less memory; {again} one or more of them as KEY=VALUE overrides"
                     + (" (they change the config, so training starts over)" if stage == "train" else "") + ":")
        width = max(len(o) for o, _ in fixes)
        lines += [f"  {overrides:<{width}}   # {why}" for overrides, why in fixes]
    else:
        lines.append("The settings are already at their smallest; use a GPU with more memory.")
    return "\n".join(lines)


def disk_message(folder: Path, error: BaseException, then: str) -> str:
    free = free_bytes(folder)
    left = f"{_size(free)} left" if free is not None else "no space left"
    return (f"disk full while writing to {folder} ({left}; {_first_line(error)}). {then} Free some space, or "
            f"set output_dir to a larger disk, and rerun the same command: finished work is kept.")


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def raise_if_disk_full(error: BaseException, folder: Path, kept: str = "") -> None:
    """Raise a ResourceError in place of `error` when it comes from a full disk under `folder`."""
    if isinstance(error, Exception) and not isinstance(error, StageError) and is_disk_full(error, folder):
        raise ResourceError(disk_message(folder, error, kept)) from None


@contextlib.contextmanager
def resource_errors(config: RunConfig, stage: str, folder: Path,
                    kept: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Turn CUDA out-of-memory and full-disk errors raised inside into a ResourceError that says what to do.
    `kept` describes, when called, what survived (e.g. the last complete checkpoint)."""
    try:
        yield
    except Exception as error:
        if is_out_of_memory(error):
            _free_cuda()
            message = oom_message(config, stage, error)
            raise ResourceError(message + (f"\n{kept()}" if kept() else "")) from None
        raise_if_disk_full(error, folder, kept())
        raise


# ---- evaluation: halve the batch on OOM -------------------------------------------------------------------

@dataclass
class SplitState:
    """The largest number of rows that fitted so far; later batches start there instead of failing again."""
    max_rows: int | None = None


def split_on_oom(fn: Callable[..., torch.Tensor], batch: dict[str, torch.Tensor], *,
                 pad_value: float, state: SplitState) -> torch.Tensor:
    """`fn(**batch)`, but on CUDA out-of-memory run it on halves of the batch's rows (recursively), and keep the
    smaller size for later calls. Outputs are concatenated by row, right-padded with `pad_value` to the
    widest. When a single row does not fit, the error propagates (`resource_errors` explains it)."""
    import torch

    n = next(iter(batch.values())).shape[0]
    size = min(n, state.max_rows or n)
    outputs: list[torch.Tensor] = []
    start = 0
    while start < n:
        part = {k: v[start:start + size] for k, v in batch.items()}
        try:
            outputs.append(fn(**part))
        except Exception as error:
            if size == 1 or not is_out_of_memory(error):
                raise
            del error  # its traceback holds the tensors of the failed attempt
            _free_cuda()
            size //= 2
            state.max_rows = size
            log.warning("CUDA out of memory on a batch of %d rows; retrying in batches of %d (eval.batch_size=%d "
                        "starts there)", size * 2, size, size)
            continue
        start += size
    if len(outputs) == 1:
        return outputs[0]
    width = max(o.shape[1] for o in outputs)
    return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad_value) for o in outputs], dim=0)
