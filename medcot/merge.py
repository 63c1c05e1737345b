"""The merge job: fold the trained LoRA adapter into 16-bit base weights, as a folder that plain
`transformers.AutoModelForCausalLM` loads without peft or Unsloth; keep a copy of the adapter beside it.

On the Unsloth backend this is Unsloth's `merged_16bit` save; elsewhere peft's `merge_and_unload` on the
full-precision base (merging into a 4-bit base would bake its quantisation error into the weights). Either way the
folder's tokenizer and generation_config.json then name the token the model was trained to end its answers with.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig

from medcot.config import RunConfig, save_config
from medcot.modeling import Runtime, load_tokenizer, resolve_model_path
from medcot.prompts import answer_end_id
from medcot.rundir import RunDir

log = logging.getLogger(__name__)


def merge_adapter(config: RunConfig, runtime: Runtime, adapter_dir: Path, out_dir: Path) -> None:
    dtype = getattr(torch, config.merge.dtype)
    if runtime.backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(adapter_dir), max_seq_length=config.model.max_seq_length,
            dtype=dtype, load_in_4bit=runtime.load_in_4bit,
        )
        model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
        carry_answer_end(out_dir, config.data.template)
        return

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(config.model.name)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, revision=config.model.revision)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.to(dtype).save_pretrained(str(out_dir), safe_serialization=True)
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
