"""How the evaluate job generates its answers: in left-padded batches, through medcot's graph decoder
(medcot.decoding) on a GPU or transformers' `generate` elsewhere, with progress, timing and out-of-memory splits.

    outputs, seconds = generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=8)

`choose_decoder` resolves eval.decoder for a model; each decoder runs behind a runner that split_on_oom calls
once per batch (_GraphRunner, _GenerateRunner), so both report progress and steady-step timing the same way.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from medcot import attention, decoding
from medcot.decoding import GraphDecoder, StepClock
from medcot.progress import Progress
from medcot.resources import SplitState, split_on_oom
from medcot.rundir import StageError

log = logging.getLogger(__name__)


class _DecodeSteps(BaseStreamer):
    """Fed by `generate` with the prompts, then with each row's new token at every decoding step: moves `progress`
    one step at a time, so that a batch of long answers shows its rate and time left while it decodes; marks each
    step on a StepClock (medcot.decoding) for the steady step and the warm-up."""

    FIRST = 3  # steps left out of the steady step: compilation and CUDA-graph capture land in them

    def __init__(self, progress: Progress, eos_ids: list[int], rows: int) -> None:
        self.progress, self.eos, self.rows = progress, torch.tensor(eos_ids), rows  # rows past `rows` are filler
        self.steps = self.tokens = 0
        self.finished = torch.zeros(0, dtype=torch.bool)
        self.clock = StepClock()

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # the prompts of a (sub-)batch: decoding starts
            self.finished = torch.zeros(min(value.shape[0], self.rows), dtype=torch.bool)
            return
        self.tokens += int((~self.finished).sum())
        self.finished |= torch.isin(value.view(-1)[:len(self.finished)], self.eos)
        self.steps += 1
        self.clock.mark(self.steps)
        rate = self.tokens / max(self.clock.marks[-1][1] - self.clock.t0, 1e-9)
        self.progress.update(1, f"{int(self.finished.sum())}/{len(self.finished)} answers ended, {rate:.0f} tokens/s")

    def end(self) -> None:
        pass

    def step_seconds(self) -> float | None:
        """The median decoding step after the first ones: the steady cost of one step for this batch."""
        return self.clock.step_seconds(self.FIRST) if self.steps > 2 * self.FIRST else None

    def warmup_seconds(self) -> float:
        """How much longer the prefill and the first decoding steps took than steady steps: the compilation (and
        CUDA-graph capture) that a static KV cache pays for each new batch shape, or ~0 where nothing compiles."""
        return self.clock.warmup_seconds(self.FIRST) if self.steps > 2 * self.FIRST else 0.0


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, do_sample: bool = False,
             temperature: float = 1.0, min_new_tokens: int | None = None, desc: str = "generate",
             add_special_tokens: bool = True, stop_ids: tuple[int, ...] = (),
             stats: dict[str, Any] | None = None, decoder: str = "auto", decode_kernel: str = "auto",
             decode_compile: bool = True,
             ) -> tuple[list[dict], float]:
    """Generate for every prompt in left-padded batches (longest prompts first, so a batch's rows have
    similar lengths). Returns per prompt {text, generated_tokens, prompt_tokens, hit_token_limit} and the seconds spent.

    `add_special_tokens=False` for prompts that carry their own (a rendered chat template); `stop_ids`: tokens that
    end an answer besides the EOS of the tokenizer and of the generation config; `decoder`, `decode_kernel`,
    `decode_compile`: eval.decoder, eval.decode_kernel and eval.decode_compile (choose_decoder); `stats`, when given,
    receives the decoder, whether its layer was compiled, `warmup_s` (what
    the prefill and first steps took beyond steady ones, summed over batches: compilation and CUDA-graph capture
    where there are some) and `step_s` (the first batch's steady step).
    """
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[dict | None] = [None] * len(prompts)
    eos_ids = sorted(set(_eos_ids(model, tokenizer)) | set(stop_ids))
    t0 = time.monotonic()
    split = SplitState()
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    chosen, why = choose_decoder(decoder, model, do_sample)
    log.info("%s: decoder %s (%s)", desc, chosen, why)
    # In decoding steps: each batch takes at most max_new_tokens; one that ends early skips the rest of its share.
    progress = Progress(f"{desc} ({len(prompts)} answers, batch {batch_size})", len(batches) * max_new_tokens, "steps")
    # A static KV cache compiles the decoding step for each batch size: a short last batch is filled up with copies
    # of its last prompt (a decoding step costs about the same for a few more rows), whose answers are dropped.
    static = getattr(model.generation_config, "cache_implementation", None) == "static"
    same_shape = len(batches) > 1 and (static or chosen == "graph")
    warmup, step_s = 0.0, None
    if chosen == "graph":
        longest = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"])
        runner: _GraphRunner | _GenerateRunner = _GraphRunner(
            model, cache_len=longest + max_new_tokens, eos_ids=eos_ids, pad_id=tokenizer.pad_token_id,
            kernel=decode_kernel, compile=decode_compile, max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or 0)
    else:
        runner = _GenerateRunner(model, eos_ids, pad_id=tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature)
    try:
        for idx in batches:
            texts = [prompts[i] for i in idx] + [prompts[idx[-1]]] * ((batch_size - len(idx)) if same_shape else 0)
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
            runner.start_batch(progress, len(idx))
            # On CUDA out-of-memory the batch is split in halves and retried (greedy output is the same).
            out = split_on_oom(runner, dict(batch), pad_value=tokenizer.pad_token_id, state=split)
            progress.update(max(max_new_tokens - runner.steps_done, 0))
            warmup += runner.clock.warmup_seconds()
            step_s = step_s if step_s is not None else runner.clock.step_seconds()
            new = out[:, batch["input_ids"].shape[1]:]
            for row, i in enumerate(idx):
                tokens = new[row].tolist()
                n = len(tokens)
                for pos, tok in enumerate(tokens):
                    if tok in eos_ids:
                        n = pos
                        break
                stopped = n < len(tokens)
                results[i] = {
                    "text": tokenizer.decode(tokens[:n], skip_special_tokens=True),
                    "generated_tokens": n,
                    "prompt_tokens": int(batch["attention_mask"][row].sum()),
                    "hit_token_limit": not stopped and n >= max_new_tokens,
                }
    finally:
        runner.close()
    progress.close()
    if stats is not None:
        stats["warmup_s"], stats["step_s"] = round(warmup, 2), step_s and round(step_s, 4)
        stats["decode_attention"], stats["decoder"], stats["decoder_why"] = runner.kernel, chosen, why
        stats["compile_s"], stats["compiled"] = runner.compile_seconds, runner.compiled
    return [r for r in results if r is not None], time.monotonic() - t0


def choose_decoder(choice: str, model, do_sample: bool) -> tuple[str, str]:
    """(eval.decoder resolved for this model, why): see EvalConfig.decoder."""
    unsupported = decoding.supported(model)
    quantized = bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
    if choice == "graph":
        if do_sample:
            raise StageError("eval.decoder graph decodes greedily: set eval.do_sample false, or eval.decoder auto")
        if unsupported or quantized:
            raise StageError(f"eval.decoder graph cannot decode this model: {unsupported or 'quantized weights'}; "
                             "set eval.decoder auto or transformers")
        return "graph", "eval.decoder graph"
    if choice == "transformers":
        return "transformers", "eval.decoder transformers"
    on_gpu = next(model.parameters()).device.type == "cuda"
    reasons = [r for r, bad in (("sampling", do_sample), ("not on a GPU", not on_gpu),
                                ("quantized weights", quantized), (unsupported or "", bool(unsupported))) if bad]
    if reasons:
        return "transformers", "auto: " + ", ".join(reasons)
    return "graph", "auto: greedy, 16-bit weights on a GPU, a Llama-architecture model"


class _GenerateRunner:
    """split_on_oom's function for transformers' `generate`, with the progress and timing of each batch
    (_DecodeSteps, its streamer)."""

    compile_seconds = None
    compiled = None  # transformers compiles a static cache's step itself

    def __init__(self, model, eos_ids: list[int], *, pad_id: int, max_new_tokens: int, min_new_tokens: int | None,
                 do_sample: bool, temperature: float) -> None:
        self.model, self.eos_ids = model, eos_ids
        self.kernel = _decode_attention(model)
        self.kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample,
                                       "pad_token_id": pad_id, "eos_token_id": eos_ids}
        if do_sample:
            self.kwargs["temperature"] = temperature
        else:  # silence the sampling defaults a model's generation_config may carry
            self.kwargs.update(temperature=None, top_p=None, top_k=None)
        if min_new_tokens:
            self.kwargs["min_new_tokens"] = min_new_tokens

    def start_batch(self, progress: Progress, rows: int) -> None:
        self.clock = _DecodeSteps(progress, self.eos_ids, rows)

    @property
    def steps_done(self) -> int:
        return self.clock.steps

    def __call__(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.model.generate(**batch, **self.kwargs, streamer=self.clock)

    def close(self) -> None:
        pass


class _GraphRunner:
    """split_on_oom's function for medcot.decoding: a GraphDecoder for the batch's row count (a new one, and the old
    one's buffers given back, when an out-of-memory split changes it), progress and timing per batch."""

    def __init__(self, model, *, cache_len: int, eos_ids: list[int], pad_id: int, kernel: str, compile: bool,
                 max_new_tokens: int, min_new_tokens: int) -> None:
        self.model, self.cache_len, self.eos_ids, self.pad_id, self.kernel_choice = model, cache_len, eos_ids, pad_id, kernel
        self.compile = compile
        self.compiled: bool | None = None  # whether the decoder's layer was compiled (eval.decode_compile on a GPU)
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.decoder = None
        self.kernel: str | None = None
        self.compile_seconds: float | None = None

    def start_batch(self, progress: Progress, rows: int) -> None:
        self.progress, self.rows, self.steps_done, self.clock = progress, rows, 0, StepClock()
        self.tokens, self.running = 0, None

    def _on_steps(self, steps: int, ended: int) -> None:
        """Every decoding.CHECK_EVERY steps: the rows still running at the last check generated a token each step."""
        self.clock.mark(steps)
        running = self.running if self.running is not None else min(self.rows, self.batch_rows)
        self.tokens += running * (steps - self.steps_done)
        self.running = max(min(self.rows, self.batch_rows) - ended, 0)
        rate = self.tokens / max(time.monotonic() - self.clock.t0, 1e-9)
        self.progress.update(steps - self.steps_done, f"{min(ended, self.rows)}/{self.rows} answers ended, "
                             f"{rate:.0f} tokens/s")
        self.steps_done = steps

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        self.batch_rows = rows = input_ids.shape[0]
        try:
            if self.decoder is None or self.decoder.batch != rows:
                self.close()
                self.decoder = GraphDecoder(self.model, batch=rows, cache_len=self.cache_len, eos_ids=self.eos_ids,
                                            pad_id=self.pad_id, kernel=self.kernel_choice,
                                            compile=self.compile and self.model.device.type == "cuda")
                self.kernel, self.compiled = self.decoder.kernel, self.decoder.compile
            out = self.decoder.run(input_ids, attention_mask, max_new_tokens=self.max_new_tokens,
                                   min_new_tokens=self.min_new_tokens, on_steps=self._on_steps)
            if self.compile_seconds is None:
                self.compile_seconds = self.decoder.compile_seconds
            return out
        except Exception:
            self.close()  # an out-of-memory split retries with smaller buffers
            raise

    def close(self) -> None:
        if self.decoder is not None:
            self.decoder.close()
            self.decoder = None


def _decode_attention(model) -> str | None:
    """The kernel of the grouped decoding step (medcot.attention) where the model decodes with it on a GPU."""
    on_gpu = next(model.parameters()).device.type == "cuda"
    return attention.decode_kernel if on_gpu and getattr(model.config, "_attn_implementation", None) == attention.GQA_DECODE else None


def _eos_ids(model, tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    return sorted(i for i in ids if i is not None)
