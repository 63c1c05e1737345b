"""The merge job: fold the trained LoRA adapter into 16-bit base weights, as a folder that plain
`transformers.AutoModelForCausalLM` loads without peft or Unsloth; keep a copy of the adapter beside it.

peft's `merge_and_unload` on the full-precision base (merging into a 4-bit base would bake its quantisation error
into the weights), whichever backend trained the adapter: Unsloth saves a plain peft adapter, and a 16-bit merge
needs none of its kernels (its import alone took 31 s of the merge job's 105 s on the 8B model, BENCHMARKS.md).
The folder's tokenizer and generation_config.json then name the token the model was trained to end its
answers with.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig

from medcot.config import RunConfig, save_config
from medcot.modeling import Runtime, free_gpu_bytes, load_tokenizer, parameter_count, resolve_model_path
from medcot.prompts import answer_end_id
from medcot.rundir import RunDir

log = logging.getLogger(__name__)

MAX_SHARD_SIZE = "5GB"
MERGE_MARGIN_BYTES = 2 * 2**30  # CUDA context and the merge's temporaries (one layer's delta at a time)


def merge_precision(params: int | None, free_bytes: int | None, dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """(dtype, device) the base is loaded in for the merge: fp32 on the GPU where it fits (the merged weights are
    then rounded to merge.dtype once, as on a CPU), else merge.dtype on the GPU (the sum is rounded twice, within
    half a unit of the last place more), else fp32 on the CPU (minutes for an 8B model instead of seconds)."""
    if params is not None and free_bytes is not None:
        if params * 4 * 1.05 + MERGE_MARGIN_BYTES <= free_bytes:
            return torch.float32, "cuda"
        if params * dtype.itemsize * 1.05 + MERGE_MARGIN_BYTES <= free_bytes:
            return dtype, "cuda"
    return torch.float32, "cpu"


def merge_adapter(config: RunConfig, runtime: Runtime, adapter_dir: Path, out_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, config.merge.dtype)
    path = resolve_model_path(config.model.name)
    params = free = None
    if runtime.device == "cuda":
        free = free_gpu_bytes()
        try:
            params = parameter_count(path, config.model.revision)
        except Exception as e:  # noqa: BLE001 -- sizing is advisory: unknown means the CPU, which always fits
            log.info("merge: cannot size %s (%s); merging on the CPU", config.model.name, e)
    load_dtype, device = merge_precision(params, free, dtype)
    log.info("merge: base loaded in %s on the %s", str(load_dtype).removeprefix("torch."), device.upper())
    base = AutoModelForCausalLM.from_pretrained(path, dtype=load_dtype, revision=config.model.revision,
                                                device_map={"": device} if device == "cuda" else None)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    # 5 GB shards, the Hub's convention (transformers 5 writes one file up to 50 GB): downloads resume per shard, and
    # the push job hashes the shards side by side.
    merged.to(dtype).save_pretrained(str(out_dir), safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    load_tokenizer(str(adapter_dir)).save_pretrained(str(out_dir))
    carry_answer_end(out_dir, config.data.template)


def carry_answer_end(folder: Path, template: str) -> int:
    """Make a model folder's tokenizer EOS and generation_config.json's eos_token_id name the token the model was
    trained to end its answers with (medcot.prompts.answer_end_id), and return its id.

    A server stops where these say: vLLM and TGI on generation_config's eos_token_id (a list), llama.cpp's converter
    (Ollama) on the tokenizer's EOS. A chat template can close turns with another token than the EOS (Llama 3's first
    releases: <|eot_id|> against <|end_of_text|>); a model served without it never stops.
    """
    tokenizer = load_tokenizer(str(folder))
    end = answer_end_id(template, tokenizer)
    token = tokenizer.convert_ids_to_tokens(end)
    if tokenizer.eos_token != token:
        log.info("merge: the tokenizer's EOS becomes %s (was %s), the token training ended answers with", token,
                 tokenizer.eos_token)
        tokenizer.eos_token = token
        tokenizer.save_pretrained(str(folder))
    if (folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(str(folder))
    else:
        generation = GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(folder)))
    eos = generation.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if end not in eos:
        generation.eos_token_id = [*eos, end] if eos else end
        generation.save_pretrained(str(folder))
    return end


def merged_model_config(config: RunConfig) -> RunConfig:
    """The config with `model` pointing at the merge stage's folder: what the push job ships is what evaluate-after
    loads and scores (a StageError names the merge job when the folder is not finished)."""
    run = RunDir(config.run_dir)
    run.require("merge", needed_by="evaluate --stage after")
    model = config.model.model_copy(update={"name": str(run.stage("merge") / "model"), "revision": None})
    return config.model_copy(update={"model": model})


def merge_stage(config: RunConfig, runtime: Runtime, force: bool = False) -> int:
    started = time.monotonic()
    run = RunDir(config.run_dir)
    train = run.require("train", needed_by="merge")
    inputs = {"train": train.identity()}
    config_hash = config.section_hash("model", "merge")
    if run.check_done("merge", config_hash, inputs, force):
        log.info("merge: already finished in %s with this adapter; nothing to do (delete the stage folder to redo it)", run.stage("merge"))
        return 0
    adapter = run.stage("train") / "adapter"
    with run.publishing("merge", config_hash, inputs, started=started) as (tmp, manifest):
        shutil.copytree(adapter, tmp / "adapter")
        log.info("merge: merging %s into %s weights of %s", adapter, config.merge.dtype, config.model.name)
        merge_adapter(config, runtime, adapter, tmp / "model")
        save_config(config, tmp / "config.yaml")
        manifest.extra = {"dtype": config.merge.dtype, "backend": runtime.backend,
                          "bytes": sum(f.stat().st_size for f in (tmp / "model").rglob("*") if f.is_file())}
    log.info("merge: done; merged model in %s (%.2f GB)", run.stage("merge") / "model", manifest.extra["bytes"] / 1e9)
    return 0
