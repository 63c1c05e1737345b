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
import json
import logging
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcot.compilecache import use_compile_cache
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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware, with AMX tiles or AVX-512 BF16: there PyTorch's oneDNN
    kernels run medcot's CPU work faster in bf16 than in fp32. Measured with bench/cpu_dtype.py (2026-12-03) on 2 cores,
    a SmolLM2-135M-shaped model: on a Xeon with AMX, 4.5x fp32's prefill, 2.2x its decoding steps, 1.5x its LoRA
    training tokens/s; on an AMD EPYC with AVX-512 BF16, 2.1x the prefill, 0.9x the decoding steps, 1.7x the training
    (the demo's jobs 194 s against 261 s in fp32). Without bf16 instructions (AVX2 only) bf16 is emulated, 9x slower
    than fp32 to train on an AMD EPYC: fp32 there."""
    import torch

    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None), getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and probe() for probe in probes)


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
    if cuda:
        import torch

        rank = int(os.environ.get("LOCAL_RANK", 0))
        use_compile_cache(torch.cuda.get_device_name(rank), torch.cuda.get_device_capability(rank), torch.version.cuda)
    backend = cfg.backend
    if backend in ("auto", "unsloth"):
        reason = None
        if not cuda:
            reason = "no CUDA GPU is visible (Unsloth runs on NVIDIA GPUs only)"
        elif importlib.util.find_spec("unsloth") is None:
            reason = "the `unsloth` package is not installed (make setup-gpu, or pip install -e '.[gpu]')"
        else:
            from medcot.unsloth_trainers import sft_only

            sft_only()  # Unsloth rewrites TRL's SFT trainer alone, not every trainer TRL ships (2.6-6.6 s less)
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
        dtype = ("bfloat16" if cpu_has_native_bf16() else "float32") if cfg.dtype == "auto" else cfg.dtype
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
    """Attach a fresh LoRA adapter with the config's settings (use_gradient_checkpointing resolved: resolve_checkpointing)."""
    if lora.use_gradient_checkpointing == "auto":
        raise ValueError("lora.use_gradient_checkpointing 'auto' must be resolved for this GPU before the adapter is "
                         "attached: pass the config through medcot.modeling.resolve_checkpointing")
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
    else:
        from medcot import attention

        implementation = attention.use_for_inference(model, config.eval.attention, config.eval.decode_kernel)
        log.info("inference attention: %s%s", implementation,
                 f" (decoding step: {attention.decode_kernel})" if implementation == attention.GQA_DECODE else "")
        if runtime.device == "cuda" and not runtime.load_in_4bit:
            # A static KV cache makes transformers compile the decoding step (CUDA graphs): launch-bound decoding
            # of an 8B model goes from ~12 to ~100 tokens/s at batch 1. The first batch of each size compiles.
            model.generation_config.cache_implementation = "static"
    model.eval()
    return model, tokenizer


# ---- what the evaluate job loads -------------------------------------------------------------------

PROMPT_TOKENS_BUDGET = 512  # prompt length assumed when sizing the KV cache (the inference prompt + a long question)
EVAL_MARGIN_BYTES = 2 * 2**30  # CUDA context, compiled graphs, allocator slack


def plan_eval_model(config: RunConfig) -> tuple[ModelConfig, str]:
    """(model settings the evaluate job loads with, '4bit' | '16bit'); see EvalConfig.weights.

    16-bit runs on transformers whatever model.backend says: it compiles the decoding step for a static
    KV cache, which Unsloth's decoding does not do (BENCHMARKS.md: 16-bit static beat Unsloth 4-bit).
    """
    if not _cuda_available():
        return config.model, "16bit"  # 4-bit needs CUDA: select_backend loads full precision and says so
    free = free_gpu_bytes() if config.eval.weights == "auto" and config.model.load_in_4bit else None
    weights = choose_eval_weights(config, free)
    if weights == "4bit":
        return config.model.model_copy(update={"load_in_4bit": True}), "4bit"
    return config.model.model_copy(update={"load_in_4bit": False, "backend": "transformers"}), "16bit"


def choose_eval_weights(config: RunConfig, free_bytes: int | None) -> str:
    """eval.weights resolved on a GPU with `free_bytes` of free memory."""
    if config.eval.weights != "auto":
        return config.eval.weights
    if not config.model.load_in_4bit:
        return "16bit"  # trained on 16-bit weights: evaluate the same
    need = eval_memory_bytes_16bit(config)
    choice = "16bit" if need is not None and free_bytes is not None and need <= free_bytes else "4bit"
    log.info("eval.weights auto -> %s (16-bit weights and KV cache need %s; %s free on the GPU)", choice,
             f"{need / 2**30:.1f} GiB" if need else "an unknown amount",
             f"{free_bytes / 2**30:.1f} GiB" if free_bytes is not None else "unknown")
    return choice


def eval_memory_bytes_16bit(config: RunConfig) -> int | None:
    """GPU memory the 16-bit evaluation needs: weights, KV cache of a full batch, margin; None if unknown."""
    sized = _model_size(config, "16-bit evaluation")
    if sized is None:
        return None
    model_config, params = sized
    if model_config.get("quantization_config"):
        return None  # a pre-quantized checkpoint has no 16-bit weights to load
    text = model_config.get("text_config", model_config)
    rows = config.eval.batch_size if isinstance(config.eval.batch_size, int) else AUTO_BATCH_FLOOR
    per_row = eval_row_bytes(text, PROMPT_TOKENS_BUDGET, config.eval.max_new_tokens, 2)
    return math.ceil(params * 2 * 1.05) + rows * per_row + EVAL_MARGIN_BYTES


AUTO_BATCH_FLOOR = 8  # rows that 16-bit weights must leave room for, when eval.batch_size is auto
CPU_AUTO_BATCH = 32  # a CPU decoding step of 32 rows cost about what one of 8 did (configs/demo.yaml)
AUTO_LOSS_BATCH = 8  # held-out loss rows per forward when eval.batch_size is auto


def eval_row_bytes(text_config: dict[str, Any], prompt_tokens: int, new_tokens: int, dtype_bytes: int) -> int:
    """GPU memory one generated row holds: its KV cache over prompt and answer, one layer's prefill activations
    (inference frees each layer's before the next), and last-position logits in fp32 (a few copies)."""
    heads = text_config["num_attention_heads"]
    head_dim = text_config.get("head_dim") or text_config["hidden_size"] // heads
    kv_per_token = 2 * text_config["num_hidden_layers"] * text_config.get("num_key_value_heads", heads) * head_dim * dtype_bytes
    hidden, intermediate = text_config["hidden_size"], text_config.get("intermediate_size", 4 * text_config["hidden_size"])
    prefill = prompt_tokens * dtype_bytes * (6 * hidden + 3 * intermediate)
    return kv_per_token * (prompt_tokens + new_tokens) + prefill + text_config["vocab_size"] * 4 * 4


def plan_eval_batch(config: RunConfig, model_config: dict[str, Any], *, questions: int, prompt_tokens: int,
                    dtype_bytes: int, free_bytes: int | None) -> tuple[int, str]:
    """(rows generated together, why); see EvalConfig.batch_size. `free_bytes`: the GPU's free memory with the model
    loaded, None on a CPU. Batches come out equal in size, so the decoding step compiles for one shape."""
    chosen = config.eval.batch_size
    if chosen != "auto":
        return chosen, "set in the config"
    if free_bytes is None:
        fit, why = CPU_AUTO_BATCH, f"CPU: up to {CPU_AUTO_BATCH} rows"
    else:
        per_row = eval_row_bytes(model_config.get("text_config", model_config), prompt_tokens,
                                 config.eval.max_new_tokens, dtype_bytes)
        usable = free_bytes * 0.9 - EVAL_MARGIN_BYTES
        fit = max(int(usable // per_row), 1)
        why = (f"a row's KV cache ({prompt_tokens}+{config.eval.max_new_tokens} tokens) and activations need "
               f"{per_row / 2**20:.0f} MiB; {free_bytes / 2**30:.1f} GiB free: room for {fit} rows")
    batches = math.ceil(questions / fit)
    batch = math.ceil(questions / batches)
    return batch, f"{why}; {questions} questions in {batches} batch{'es' if batches > 1 else ''} of {batch}"


# ---- gradient checkpointing for the train job ------------------------------------------------------

TRAIN_MARGIN_BYTES = 4 * 2**30  # CUDA context, allocator fragmentation, compiled kernels' workspaces


def plan_checkpointing(config: RunConfig, runtime: Runtime) -> tuple[bool | str, str]:
    """(lora.use_gradient_checkpointing resolved, why); see LoraConfig.use_gradient_checkpointing.

    auto: none where a full micro-batch's activations fit in the GPU's free memory beside the weights (no
    forward pass recomputed: 1.4x the tokens/s of checkpointing at 2x2048 on an H100, BENCHMARKS.md), else
    Unsloth's offloaded checkpointing (plain checkpointing on the transformers backend). CPU: none."""
    choice = config.lora.use_gradient_checkpointing
    if choice != "auto":
        return choice, "set in the config"
    if runtime.device != "cuda":
        return False, "CPU training"
    free = free_gpu_bytes()
    need = train_memory_bytes_without_checkpointing(config, runtime)
    if need is None:
        return "unsloth", "cannot size the model's activations"
    sizes = f"activations and weights need ~{need / 2**30:.1f} GiB"
    if need <= free:
        return False, f"{sizes} of {free / 2**30:.1f} GiB free"
    return "unsloth", f"{sizes}, {free / 2**30:.1f} GiB free"


def resolve_checkpointing(config: RunConfig, runtime: Runtime) -> tuple[RunConfig, str]:
    """The config that load_model and add_lora take, its use_gradient_checkpointing `auto` resolved (plan_checkpointing),
    and why. The train job keeps the config as written for its hash (checkpointing changes speed, not the result)."""
    checkpointing, why = plan_checkpointing(config, runtime)
    lora = config.lora.model_copy(update={"use_gradient_checkpointing": checkpointing})
    return config.model_copy(update={"lora": lora}), why


def checkpointing_name(value: bool | str) -> str:
    """lora.use_gradient_checkpointing as the logs and the benchmark tables say it."""
    return {False: "none", True: "plain", "unsloth": "unsloth (offloaded)"}.get(value, str(value))


def free_gpu_bytes() -> int:
    """Free memory of this process's GPU (LOCAL_RANK's under torchrun)."""
    import torch

    return torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))[0]


def train_memory_bytes_without_checkpointing(config: RunConfig, runtime: Runtime) -> int | None:
    """GPU memory a training step of the config's model needs with every activation kept; None if the model
    cannot be sized (its config.json and safetensors headers, local or on the Hub)."""
    sized = _model_size(config, "training without checkpointing")
    if sized is None:
        return None
    model_config, params = sized
    tokens = config.training.per_device_train_batch_size * config.model.max_seq_length
    return training_memory_bytes(model_config.get("text_config", model_config), params, tokens,
                                 backend=runtime.backend, load_in_4bit=runtime.load_in_4bit)


def training_memory_bytes(text_config: dict[str, Any], params: int, tokens: int, *, backend: str,
                          load_in_4bit: bool) -> int:
    """Weights (4-bit NF4 with 16-bit embeddings, or 16-bit), the activations of `tokens` tokens in one
    micro-batch with none recomputed, and a margin.

    Per token and layer, 2 bytes x (6 x hidden + 3 x intermediate) on the Unsloth path: about what its fused
    kernels keep (the 8B model on an H100, padded batches, no checkpointing, peaked at 20.8 GiB at 2x2048 and
    66.2 GiB at 8x2048: 3.7 MiB a token; this gives 4.0). The transformers path keeps more and materialises
    fp32 logits; its factors (10 x hidden + 5 x intermediate, 6 bytes a logit) are an upper guess, unmeasured."""
    hidden, layers, vocab = text_config["hidden_size"], text_config["num_hidden_layers"], text_config["vocab_size"]
    intermediate = text_config.get("intermediate_size", 4 * hidden)
    embeddings = vocab * hidden * (1 if text_config.get("tie_word_embeddings") else 2)
    weights = (params - embeddings) * 0.55 + embeddings * 2 if load_in_4bit else params * 2
    if backend == "unsloth":
        activations = tokens * layers * 2 * (6 * hidden + 3 * intermediate)
    else:
        activations = tokens * layers * 2 * (10 * hidden + 5 * intermediate) + tokens * vocab * 6
    return math.ceil(weights + activations) + TRAIN_MARGIN_BYTES


def _model_size(config: RunConfig, purpose: str) -> tuple[dict[str, Any], int] | None:
    """(config.json, parameter count) of the config's model, local or on the Hub; None (logged) if unreadable."""
    path = resolve_model_path(config.model.name)
    try:
        return _read_json(path, "config.json", config.model.revision), parameter_count(path, config.model.revision)
    except Exception as e:  # noqa: BLE001 -- sizing is advisory: any failure means "not sure it fits"
        log.info("cannot size %s for %s (%s)", config.model.name, purpose, e)
        return None


def _read_json(path: str, filename: str, revision: str | None) -> dict[str, Any]:
    local = Path(path) / filename
    if Path(path).is_dir():
        return json.loads(local.read_text(encoding="utf-8"))
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(path, filename, revision=revision)).read_text(encoding="utf-8"))


def parameter_count(path: str, revision: str | None = None) -> int:
    """Parameters stored in a model's safetensors files (read from their headers, not their data)."""
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import get_safetensors_metadata

        return sum(get_safetensors_metadata(path, revision=revision).parameter_count.values())
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    total = 0
    for file in files:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")
    return total
