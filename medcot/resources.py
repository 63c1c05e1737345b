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
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medcot.rundir import ResourceError, first_line, raise_if_disk_full, size_text

if TYPE_CHECKING:
    import torch

    from medcot.config import RunConfig

log = logging.getLogger(__name__)


def is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    # bitsandbytes and some CUDA kernels raise a plain RuntimeError for the same condition.
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


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
    lines = [f"CUDA out of memory during {what}{where} ({first_line(error)})."]
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        lines.append(f"Peak allocated {size_text(torch.cuda.max_memory_allocated())} of the GPU's {size_text(total)}.")
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


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
