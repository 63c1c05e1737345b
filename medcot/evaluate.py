"""The evaluate job: answer held-out, showcase and multiple-choice questions with the serving prompt (data.template),
score the answers, and measure the held-out loss of the reference reasoning (teacher-forced).

`before` evaluates the base model, `after` the merge job's folder (the base with the trained adapter folded in, the
model that is pushed); both see the same questions, prompts and decoding settings, so their summaries compare like
with like.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from medcot.config import McqSourceConfig, RunConfig, save_config
from medcot.data import Example, data_inputs, prepare, tokenize_example
from medcot.generation import generate
from medcot.mcq import read_mcq
from medcot.merge import merged_model_config
from medcot.metrics import summarize
from medcot.modeling import (
    AUTO_LOSS_BATCH,
    Runtime,
    load_tokenizer,
    load_with_adapter,
    plan_eval_batch,
    resolve_model_path,
)
from medcot.progress import Progress
from medcot.prompts import answer_end_id, mcq_question, parse_generation, serving_prompt
from medcot.resources import SplitState, resource_errors, split_on_oom
from medcot.rundir import RunDir, StageError, write_json

log = logging.getLogger(__name__)

STAGE_SECTIONS = ("model", "data", "eval")


@dataclass(frozen=True)
class EvalItem:
    id: str
    source: str  # "heldout" | "showcase" | "mcq:<name>"
    question: str
    reference: str | None = None
    options: dict[str, str] | None = None
    correct_choice: str | None = None


def heldout_items(examples: list[Example], limit: int | None) -> list[EvalItem]:
    chosen = examples[:limit] if limit else examples
    return [EvalItem(f"heldout-{ex.row}", "heldout", ex.question, ex.response) for ex in chosen]


def mcq_items(source: McqSourceConfig) -> list[EvalItem]:
    """Multiple-choice rows, in the shape their benchmark publishes them (medcot.mcq), as prompts."""
    name, rows = read_mcq(source)
    return [EvalItem(f"mcq:{name}:{row.id}", f"mcq:{name}", mcq_question(row.stem, row.options), options=row.options,
                     correct_choice=row.answer) for row in rows]


def eval_items(config: RunConfig, heldout: list[Example]) -> list[EvalItem]:
    items = heldout_items(heldout, config.eval.heldout_limit)
    items += [EvalItem(f"showcase-{i}", "showcase", q) for i, q in enumerate(config.eval.showcase_questions)]
    for source in config.eval.mcq:
        items += mcq_items(source)
    return items


# ---- held-out loss ---------------------------------------------------------------------------------

@torch.inference_mode()
def heldout_token_losses(model, tokenizer, examples: list[Example], batch_size: int,
                         template: str = "recipe") -> list[tuple[float, int]]:
    """(sum of NLL, token count) of the reference `<think>` reasoning, answer and end token given the prompt."""
    device = next(model.parameters()).device
    split = SplitState()
    progress = Progress(f"held-out loss ({len(examples)} rows, batch {batch_size})", len(examples), "rows")
    # Longest rows first, batched with rows of similar length: less padding, and out-of-memory shows in the first batch.
    tokenized = [tokenize_example(ex, tokenizer, template) for ex in examples]
    order = sorted(range(len(tokenized)), key=lambda i: -len(tokenized[i]["input_ids"]))
    by_row: dict[int, tuple[float, int]] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        encoded = [tokenized[i] for i in rows]
        width = max(len(e["input_ids"]) for e in encoded)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.full((len(encoded), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for r, e in enumerate(encoded):  # right padding: positions stay those of training
            n = len(e["input_ids"])
            ids[r, :n] = torch.tensor(e["input_ids"])
            mask[r, :n] = 1
            target[r, :n] = torch.tensor(e["completion_mask"], dtype=torch.bool)
        ids, mask, target = ids.to(device), mask.to(device), target.to(device)
        # Logits only from the position before the batch's first scored token: the prompts' logits (about 40% of
        # the positions here, each a row of the vocabulary) are never read.
        keep = min(width - int(target.float().argmax(dim=1).min()) + 1, width)
        nll = split_on_oom(partial(_token_nll, model, keep=keep), {"input_ids": ids, "attention_mask": mask},
                           pad_value=0.0, state=split)
        scored = target[:, width - keep + 1:]
        sums, counts = torch.where(scored, nll, 0.0).sum(dim=1).tolist(), scored.sum(dim=1).tolist()
        for r, i in enumerate(rows):
            by_row[i] = (float(sums[r]), int(counts[r]))
        progress.update(len(encoded))
    progress.close()
    return [by_row[i] for i in range(len(examples))]


def _token_nll(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int) -> torch.Tensor:
    """NLL of each of the last `keep - 1` tokens given what precedes it, [rows, keep - 1]."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    logits, targets = logits[:, -keep:-1], input_ids[:, 1 - keep:]  # a forward may ignore logits_to_keep
    # Row by row in fp32: a row's [positions, vocabulary] block stays in cache, 2.6x faster on a CPU than the batch's.
    return torch.stack([torch.nn.functional.cross_entropy(logits[r].float(), targets[r], reduction="none")
                        for r in range(len(logits))])


# ---- the stage -------------------------------------------------------------------------------------

def stage_name(which: str) -> str:
    return f"eval-{which}"


def evaluate_stage(config: RunConfig, runtime: Runtime, which: str, force: bool = False) -> int:
    started = time.monotonic()
    run = RunDir(config.run_dir)
    name = stage_name(which)
    inputs = data_inputs(config)
    evaluated = config
    if which == "after":
        inputs["merge"] = run.require("merge", needed_by="evaluate --stage after").identity()
        evaluated = merged_model_config(config)
    config_hash = config.section_hash(*STAGE_SECTIONS)
    if run.check_done(name, config_hash, inputs, force):
        log.info("%s: already finished in %s with this config and inputs; nothing to do (delete the stage folder to redo it)", name, run.stage(name))
        return 0

    tokenizer = load_tokenizer(resolve_model_path(config.model.name), config.model.revision)
    data = prepare(config.data, tokenizer, config.model.max_seq_length)
    items = eval_items(config, data.heldout)
    if not items:
        raise StageError("nothing to evaluate: no held-out rows, no showcase questions and no eval.mcq sources")
    log.info("%s: %d questions (%d held out, %d showcase, %d multiple choice), max_new_tokens %d",
             name, len(items), sum(i.source == "heldout" for i in items), sum(i.source == "showcase" for i in items),
             sum(i.source.startswith("mcq:") for i in items), config.eval.max_new_tokens)

    t0 = time.monotonic()
    with resource_errors(config, "eval", run.root):  # out of memory: says which config changes need less
        model, tokenizer = load_with_adapter(evaluated, runtime, None)
        load_s = time.monotonic() - t0
        log.info("%s: %s loaded in %.1f s", name, evaluated.model.name, load_s)
        template = config.data.template
        prompts = [serving_prompt(template, tokenizer, i.question) for i in items]
        batch, batch_why = _plan_batch(config, model, tokenizer, prompts, add_special_tokens=template != "chat")
        log.info("%s: eval.batch_size %s -> %d (%s)", name, config.eval.batch_size, batch, batch_why)

        loss_batch = config.eval.loss_batch_size or (min(batch, AUTO_LOSS_BATCH) if config.eval.batch_size == "auto" else batch)
        losses = heldout_token_losses(model, tokenizer, data.heldout, loss_batch, template) if data.heldout else None
        if losses:
            total = sum(s for s, _ in losses) / max(sum(n for _, n in losses), 1)
            log.info("%s: held-out loss %.4f (perplexity %.2f) over %d rows", name, total, math.exp(total), len(losses))

        stats: dict[str, float] = {}
        outputs, seconds = generate(
            model, tokenizer, prompts, max_new_tokens=config.eval.max_new_tokens, batch_size=batch,
            do_sample=config.eval.do_sample, temperature=config.eval.temperature, desc=name, stats=stats,
            # A rendered chat template holds its own BOS, and its answers end with the end of the assistant's turn.
            add_special_tokens=template != "chat", stop_ids=(answer_end_id(template, tokenizer),),
            decoder=config.eval.decoder, decode_kernel=config.eval.decode_kernel,
            decode_compile=config.eval.decode_compile,
        )
    rows = [_row(item, out, tokenizer) for item, out in zip(items, outputs, strict=True)]
    summary = summarize(rows, losses, seconds)
    summary.update(stage=which, backend=runtime.backend, device=runtime.device, generation_seconds=round(seconds, 2),
                   model="merged" if which == "after" else "base", weights="4bit" if runtime.load_in_4bit else runtime.dtype_name,
                   batch_size=batch, batch_size_why=batch_why, loss_batch_size=loss_batch, load_seconds=round(load_s, 2),
                   decode_warmup_seconds=stats["warmup_s"], decode_step_seconds=stats["step_s"],
                   decode_attention=stats["decode_attention"], decoder=stats["decoder"],
                   decoder_why=stats["decoder_why"], decode_compile_seconds=stats["compile_s"],
                   decode_compiled=stats["compiled"])

    with run.publishing(name, config_hash, inputs, started=started) as (tmp, _):
        with (tmp / "generations.jsonl").open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        write_json(tmp / "summary.json", summary)
        save_config(config, tmp / "config.yaml")
    log.info("%s: %d answers in %.0f s (%.0f generated tokens/s); results in %s", name, len(rows), seconds,
             summary.get("generated_tokens_per_s") or 0, run.stage(name))
    return 0


def _plan_batch(config: RunConfig, model, tokenizer, prompts: list[str], add_special_tokens: bool) -> tuple[int, str]:
    """eval.batch_size resolved for this model, on this device, for these prompts (see plan_eval_batch)."""
    device = next(model.parameters()).device
    longest = max(len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"])
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    dtype_bytes = torch.finfo(model.dtype).bits // 8 if model.dtype.is_floating_point else 2
    return plan_eval_batch(config, model.config.to_dict(), questions=len(prompts), prompt_tokens=longest,
                           dtype_bytes=dtype_bytes, free_bytes=free)


def _row(item: EvalItem, out: dict, tokenizer) -> dict[str, Any]:
    parsed = parse_generation(out["text"])

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0

    return {
        "id": item.id, "source": item.source, "question": item.question, "reference": item.reference,
        "options": item.options, "correct_choice": item.correct_choice,
        "reasoning": parsed.reasoning, "answer": parsed.answer, "raw": out["text"],
        "prompt_tokens": out["prompt_tokens"], "reasoning_tokens": count(parsed.reasoning),
        "answer_tokens": count(parsed.answer), "generated_tokens": out["generated_tokens"],
        "think_closed": parsed.think_closed, "hit_token_limit": out["hit_token_limit"],
    }
