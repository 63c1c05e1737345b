"""Model backends: Unsloth on a CUDA GPU, transformers + peft everywhere else.

    backend: auto -> Unsloth when a CUDA GPU is present and `unsloth` imports, else transformers+peft.
    transformers on CUDA loads 4-bit NF4 through bitsandbytes when asked; on CPU it loads full precision
    (4-bit needs CUDA) and says so.

Unsloth patches transformers, TRL and peft when it is imported, so it must be imported before them:
`select_backend` is the one place that imports it, and jobs call it before importing anything that pulls
in transformers (medcot.training, medcot.evaluate, medcot.merge).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcot.config import LoraConfig, ModelConfig, RunConfig

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"


class BackendError(RuntimeError):
    """The requested backend or model cannot run here; the message says what to change."""


@dataclass(frozen=True)
class Runtime:
    backend: str  # "unsloth" | "transformers"
    device: str  # "cuda" | "cpu"
    dtype_name: str  # "bfloat16" | "float16" | "float32"
    load_in_4bit: bool

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_model_path(name: str) -> str:
    """A Hub id or local folder as given; `embedded:...` becomes the cached SmolLM2 folder."""
    if name.startswith(EMBEDDED_PREFIX):
        from medcot.embedded import EMBEDDED_MODEL_ID, embedded_model_dir

        if name != EMBEDDED_MODEL_ID:
            raise BackendError(f"model.name {name!r}: the only embedded model is {EMBEDDED_MODEL_ID!r}")
        return str(embedded_model_dir())
    return name


def select_backend(cfg: ModelConfig) -> Runtime:
    """Decide backend, device, dtype and quantisation; import Unsloth first when it is chosen."""
    cuda = _cuda_available()
    backend = cfg.backend
    if backend in ("auto", "unsloth"):
        reason = None
        if not cuda:
            reason = "no CUDA GPU is visible (Unsloth runs on NVIDIA GPUs only)"
        elif importlib.util.find_spec("unsloth") is None:
            reason = "the `unsloth` package is not installed (make setup-gpu, or pip install -e '.[gpu]')"
        else:
            try:
                import unsloth  # noqa: F401  -- must precede transformers/trl/peft: it patches them
            except Exception as e:  # unsloth raises plain Exceptions/ImportErrors on unsupported setups
                reason = f"`import unsloth` failed: {e}"
        if reason and backend == "unsloth":
            raise BackendError(f"model.backend is 'unsloth' but {reason}; set model.backend to auto or transformers")
        if reason:
            log.info("backend: transformers+peft (%s)", reason)
            backend = "transformers"
        else:
            backend = "unsloth"

    if cuda:
        import torch

        bf16 = torch.cuda.is_bf16_supported()
        dtype = {"auto": "bfloat16" if bf16 else "float16"}.get(cfg.dtype, cfg.dtype)
        load_4bit = cfg.load_in_4bit
    else:
        dtype = "float32" if cfg.dtype == "auto" else cfg.dtype
        load_4bit = False
        if cfg.load_in_4bit:
            log.warning("model.load_in_4bit: skipped on CPU (bitsandbytes 4-bit needs CUDA); loading %s weights", dtype)
    runtime = Runtime(backend=backend, device="cuda" if cuda else "cpu", dtype_name=dtype, load_in_4bit=load_4bit)
    log.info("backend: %s on %s, %s%s", runtime.backend, runtime.device, dtype, ", 4-bit NF4 base" if load_4bit else "")
    return runtime


def check_target_modules(config: RunConfig) -> None:
    """Refuse LoRA target modules the model does not have, before any weights load.

    Builds the architecture from its config on the meta device (no memory, no weights download).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(config.model.name)
    try:
        model_config = AutoConfig.from_pretrained(path, revision=config.model.revision)
    except (OSError, ValueError) as e:
        raise BackendError(f"model.name {config.model.name!r}: cannot read its config ({e})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    leaf_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    missing = [m for m in config.lora.target_modules if m not in leaf_names]
    if missing:
        raise BackendError(
            f"lora.target_modules: {', '.join(missing)} not in {config.model.name} "
            f"(its linear layers: {', '.join(sorted(leaf_names))})"
        )


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    if tokenizer.eos_token is None:
        raise BackendError(f"tokenizer of {path} has no EOS token; the model could never learn to stop")
    return tokenizer


def load_model(config: RunConfig, runtime: Runtime, *, for_training: bool) -> tuple[Any, Any]:
    """(model, tokenizer) of the base model, on the runtime's device, without an adapter."""
    path = resolve_model_path(config.model.name)
    if runtime.backend == "unsloth":
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=path,
            max_seq_length=config.model.max_seq_length,
            dtype=None if config.model.dtype == "auto" else runtime.dtype,
            load_in_4bit=runtime.load_in_4bit,
            revision=config.model.revision,
            device_map={"": int(os.environ.get("LOCAL_RANK", 0))},
        )
        return model, tokenizer

    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": runtime.dtype, "revision": config.model.revision}
    if runtime.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=runtime.dtype,
        )
    if runtime.device == "cuda":
        # One whole model per process: under torchrun each rank holds its own copy on its own GPU.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    tokenizer = load_tokenizer(path, config.model.revision)
    if for_training and runtime.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(config.lora.use_gradient_checkpointing),
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return model, tokenizer


def add_lora(model, lora: LoraConfig, runtime: Runtime, max_seq_length: int):
    """Attach a fresh LoRA adapter with the config's settings."""
    if runtime.backend == "unsloth":
        from unsloth import FastLanguageModel

        return FastLanguageModel.get_peft_model(
            model,
            r=lora.r,
            target_modules=lora.target_modules,
            lora_alpha=lora.lora_alpha,
            lora_dropout=lora.lora_dropout,
            bias=lora.bias,
            use_gradient_checkpointing=lora.use_gradient_checkpointing,
            random_state=lora.random_state,
            use_rslora=lora.use_rslora,
            loftq_config=None,
            max_seq_length=max_seq_length,
        )
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    # Same role as Unsloth's random_state: the adapter's initial weights depend on it alone.
    torch.manual_seed(lora.random_state)
    peft_config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        bias=lora.bias,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        init_lora_weights="loftq" if lora.loftq else True,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, peft_config)


def load_with_adapter(config: RunConfig, runtime: Runtime, adapter_dir: Path | None):
    """(model, tokenizer) ready for inference: the base model, plus the trained adapter when given."""
    if runtime.backend == "unsloth" and adapter_dir is not None:
        from unsloth import FastLanguageModel

        # Unsloth reads adapter_config.json and loads the base it names, then the adapter.
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(adapter_dir),
            max_seq_length=config.model.max_seq_length,
            dtype=None if config.model.dtype == "auto" else runtime.dtype,
            load_in_4bit=runtime.load_in_4bit,
        )
    else:
        model, tokenizer = load_model(config, runtime, for_training=False)
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
            if not runtime.load_in_4bit:
                # Same function, fewer matmuls per token: on full-precision weights the merge is exact up to
                # rounding. (Merging into a 4-bit base would add its quantisation error, so that stays unmerged.)
                model = model.merge_and_unload()
    if runtime.backend == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    return model, tokenizer
