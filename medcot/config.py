"""One typed schema for a run: defaults, types, docs, CLI overrides and the saved resolved config.

A config is a YAML file whose keys mirror `RunConfig` below. Names follow transformers/TRL/peft
(`per_device_train_batch_size`, `lora_alpha`, `target_modules`). Secrets never live here: they come
from the environment, `/run/secrets/*` or `.env` (see `medcot.secrets`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from medcot.secrets import redact


class ConfigError(ValueError):
    """A user-fixable problem with a config file or an override: the message says where and what to do."""


class _Section(BaseModel):
    # Unknown keys are refused: a misspelled `lora_alpa` must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        "unsloth/DeepSeek-R1-Distill-Llama-8B",
        description="Hub model id, a local model folder, or 'embedded:smollm2-135m-instruct' (ships with medcot).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the model.")
    max_seq_length: int = Field(2048, gt=0, description="Longest training text in tokens; longer rows are dropped.")
    load_in_4bit: bool = Field(True, description="Load the base weights in 4-bit NF4 (QLoRA). Needs a CUDA GPU.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype: auto = bf16 where the GPU supports it, else fp16; on CPU bf16 where the "
        "processor has bf16 matrix instructions (AMX or AVX-512 BF16), else fp32."
    )
    backend: Literal["auto", "unsloth", "transformers"] = Field(
        "auto", description="auto = Unsloth when a CUDA GPU is present and unsloth imports, else transformers+peft."
    )


class ColumnsConfig(_Section):
    question: str = Field("Question", description="Column holding the question.")
    cot: str = Field("Complex_CoT", description="Column holding the chain of thought.")
    response: str = Field("Response", description="Column holding the final answer.")


class DataConfig(_Section):
    path: str = Field(
        "FreedomIntelligence/medical-o1-reasoning-SFT",
        description="Hub dataset id, or a local .jsonl/.json/.parquet/.csv file.",
    )
    name: str | None = Field("en", description="Hub dataset config name (ignored for local files).")
    split: str = Field("train", description="Dataset split to read.")
    revision: str | None = Field(None, description="Hub revision of the dataset.")
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    template: Literal["recipe", "chat"] = Field(
        "recipe",
        description="Text the model trains on and answers: recipe = the reference recipe's instruction template "
        "(medcot.prompts), closed by the tokenizer's EOS; chat = the tokenizer's own chat template, the prompt a chat "
        "endpoint (vLLM, TGI, Ollama) sends, closed by the token that ends the template's assistant turn.",
    )
    train_rows: int | None = Field(
        500, gt=0, description="Train on the first N rows of the split (null = every row not held out)."
    )
    heldout_rows: int = Field(
        100, ge=0, description="Rows right after the training rows, held out for evaluation; training never sees them."
    )
    max_drop_fraction: float = Field(
        0.2, ge=0.0, le=1.0, description="Fail if more than this share of rows is dropped as invalid."
    )


class LoraConfig(_Section):
    r: int = Field(16, gt=0, description="LoRA rank.")
    lora_alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = lora_alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA path.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases to train.")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Linear layers that get adapters; each must exist in the model.",
    )
    use_gradient_checkpointing: bool | Literal["unsloth", "auto"] = Field(
        "auto",
        description="true, false, 'unsloth' (Unsloth's offloaded checkpointing; plain checkpointing elsewhere), or "
        "'auto': none where a micro-batch's activations fit in the GPU's free memory (faster: no forward pass "
        "recomputed), else 'unsloth'; none on CPU. The train job logs its choice and records it in summary.json.",
    )
    random_state: int = Field(3407, description="Seed for the adapter's initial weights.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling.")
    loftq: bool = Field(False, description="LoftQ initialisation (not in the recipe).")


class TrainingConfig(_Section):
    per_device_train_batch_size: int = Field(
        8, gt=0, description="Rows per micro-batch per device. The recipe's 8 rows a step (the Unsloth notebook's 2 x 4) "
        "go in one micro-batch: the same gradient in fewer, larger passes (BENCHMARKS.md: 89-93 s against 132 s for "
        "2 x 4 on an H200)."
    )
    gradient_accumulation_steps: int = Field(
        1, gt=0, description="Micro-batches per optimizer step (rows a step = this x per_device_train_batch_size x GPUs)."
    )
    warmup_steps: int = Field(5, ge=0, description="Linear warm-up steps.")
    max_steps: int = Field(60, gt=0, description="Optimizer steps to train.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    optim: str = Field("adamw_8bit", description="transformers optimizer name; 8-bit ones fall back to adamw_torch on CPU.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    lr_scheduler_type: str = Field("linear", description="transformers scheduler name.")
    seed: int = Field(3407, description="Seed for data order and dropout.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision of training: auto = the model's compute dtype (model.dtype), bf16 or "
        "fp16 on GPU, bf16 or fp32 on CPU."
    )
    logging_steps: int = Field(10, gt=0, description="Log loss every N optimizer steps.")
    save_steps: int = Field(20, gt=0, description="Checkpoint every N optimizer steps (resume point after a crash).")
    save_total_limit: int = Field(2, ge=2, description="Complete checkpoints kept (at least 2, so one survives a cut-off save).")
    loss_on: Literal["all", "response"] = Field(
        "all", description="Supervise the whole text (as the recipe) or only what the model writes after the prompt "
        "('### Response:' of the recipe, the assistant's turn of the chat template)."
    )
    packing: bool = Field(False, description="Pack rows into full-length sequences (changes rows per step).")
    padding_free: bool | None = Field(
        None,
        description="Micro-batch layout: true = rows laid end to end in one sequence, no pad tokens; false = rows "
        "padded to the longest (on the Unsloth path this lets it compile each decoder block); null = padding-free on "
        "the Unsloth path for Llama models (checked by the tests), Unsloth's own choice for other architectures, padded "
        "on the transformers path. On an H200, 8 rows a micro-batch: "
        "0.64 s a step padding-free, 0.78 s padded (BENCHMARKS.md).",
    )
    sampling: Literal["random", "batch_rebalance", "group_by_length"] = Field(
        "random",
        description="Which rows form a micro-batch: random (the recipe); batch_rebalance = each optimizer step still "
        "takes a random set of rows, split into micro-batches of similar length (less padding, same gradient); "
        "group_by_length = steps of rows of similar length (changes which rows train together).",
    )
    dataloader_num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainingConfig:
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps}); lower warmup_steps")
        return self


class McqSourceConfig(_Section):
    path: str = Field(description="Hub dataset id or local .jsonl/.json/.parquet/.csv of multiple-choice rows.")
    name: str | None = Field(None, description="Hub dataset config name.")
    split: str = Field("test", description="Split to read.")
    limit: int | None = Field(None, gt=0, description="Use the first N rows.")
    format: Literal["auto", "medqa", "medmcqa", "pubmedqa", "mmlu", "columns"] = Field(
        "auto",
        description="Shape of the rows as published: medqa (question, options, answer_idx), medmcqa (question, "
        "opa..opd, cop), pubmedqa (question, context, final_decision), mmlu (question, choices, answer), or columns "
        "(the three *_column keys); auto = recognised from the columns, or columns when a *_column key is set.",
    )
    question_column: str | None = Field(None, description="format columns: column holding the stem (null = question).")
    options_column: str | None = Field(
        None, description="format columns: column holding a {letter: text} mapping or a list (null = options)."
    )
    answer_column: str | None = Field(
        None, description="format columns: column holding the correct letter, index or option text (null = answer)."
    )
    answer_index_start: Literal[0, 1] | None = Field(
        None, description="Whether integer answers count options from 0 or 1; null = 0 for mmlu, else read from the "
        "rows (an index 0, or one equal to the number of options).",
    )

    @model_validator(mode="after")
    def _columns_need_their_format(self) -> McqSourceConfig:
        named = [k for k in ("question_column", "options_column", "answer_column") if getattr(self, k)]
        if named and self.format not in ("auto", "columns"):
            raise ValueError(f"{', '.join(named)} apply to format 'columns', not '{self.format}': remove them, or "
                             "set format: columns")
        return self


class EvalConfig(_Section):
    max_new_tokens: int = Field(1200, gt=0, description="Generation budget per answer.")
    batch_size: PositiveInt | Literal["auto"] = Field(
        "auto",
        description="Prompts generated together (left padding). auto: on a GPU, the most rows whose KV cache and "
        "activations fit its free memory beside the weights, at most the number of questions, in batches of equal "
        "size (each new batch size compiles the decoding step again); on a CPU, up to 32 (a decoding step costs "
        "about the same for 8 rows as for 32). The evaluate job logs the choice and summary.json records it.",
    )
    loss_batch_size: PositiveInt | None = Field(
        None, description="Rows per forward pass of the held-out loss; null = eval.batch_size, at most 8 when that "
        "is auto. A decoding step costs little more for many rows, but the loss pass computes every position of "
        "every row: on a CPU, 8 rows at a time ran 1.9x faster than 32.",
    )
    weights: Literal["auto", "4bit", "16bit"] = Field(
        "auto",
        description="Model evaluated on a GPU: 16bit = full-precision base with the adapter merged (what the merge "
        "job ships), decoded by transformers with a static KV cache it compiles; 4bit = the 4-bit base with the "
        "adapter unmerged (Unsloth's fast inference when model.backend allows); auto = 16bit where the GPU has "
        "room for the weights and the KV cache, else 4bit. CPU always evaluates full precision.",
    )
    attention: str = Field(
        "auto",
        description="Attention of the transformers backend at inference: auto = SDPA, with one-token decoding "
        "steps attending the KV cache per KV head instead of copying it to every query head (medcot.attention); "
        "any other value is passed to transformers as attn_implementation (sdpa, eager, flash_attention_2...).",
    )
    decoder: Literal["auto", "graph", "transformers"] = Field(
        "auto",
        description="What decodes the answers: graph = medcot's greedy decoder (medcot.decoding: a static KV cache of "
        "its own, one decoder layer compiled for all of them, each step replayed from a CUDA graph, attention over "
        "each row's valid positions only); transformers = transformers' generate (with a static KV cache it compiles "
        "on a GPU). auto = graph for Llama-architecture models on a GPU with 16-bit weights and greedy decoding, else "
        "transformers.",
    )
    decode_kernel: Literal["auto", "triton", "sdpa", "efficient", "matmul"] = Field(
        "auto",
        description="What computes a decoding step's attention on a GPU: triton = medcot's split-KV kernel over each "
        "row's valid cache positions (medcot.kernels; eval.decoder graph only); sdpa = PyTorch's choice of fused "
        "kernel, efficient = its memory-efficient kernel, matmul = two batched matrix products around an fp32 "
        "softmax, each over the whole cache under a mask; auto = triton for the graph decoder where Triton runs, "
        "else efficient on GPUs of compute capability 8.0 and later, else sdpa (measured: BENCHMARKS.md).",
    )
    decode_compile: bool = Field(
        True,
        description="eval.decoder graph on a GPU: compile the decoder layer with torch.compile (Inductor fuses the "
        "norms, rotary embedding and activation: a faster step, for a compile each process pays, cut by the compile "
        "cache) or replay the layers as they are (no compile: the step is captured in a CUDA graph either way). "
        "BENCHMARKS.md has both measured.",
    )
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(0.6, gt=0, description="Sampling temperature when do_sample is true.")
    heldout_limit: int | None = Field(None, gt=0, description="Generate for at most N held-out rows (null = all).")
    showcase_questions: list[str] = Field(
        [
            "A 61-year-old woman with a long history of involuntary urine loss during activities like coughing or "
            "sneezing but no leakage at night undergoes a gynecological exam and Q-tip test. Based on these "
            "findings, what would cystometry most likely reveal about her residual volume and detrusor "
            "contractions?"
        ],
        description="Questions answered before and after training and shown side by side in the report.",
    )
    mcq: list[McqSourceConfig] = Field(default_factory=list, description="Multiple-choice benchmarks to score.")

    @model_validator(mode="after")
    def _graph_decoder_is_greedy(self) -> EvalConfig:
        if self.do_sample and self.decoder == "graph":
            raise ValueError("eval.decoder graph decodes greedily: set eval.do_sample false, or eval.decoder auto or "
                             "transformers to sample")
        return self


class LmEvalConfig(_Section):
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks or groups to run (medqa_4options, medmcqa, pubmedqa, "
        "mmlu_clinical_knowledge, multimedqa, ... or a local task); a comma-separated string works too "
        "(make lm-eval TASKS=medqa_4options,pubmedqa).",
    )
    include_path: str | None = Field(None, description="Folder of local task YAML files (the harness's --include_path).")
    model: Literal["auto", "merged", "adapter"] = Field(
        "auto", description="merged = the merge job's folder (what is served); adapter = base + the trained adapter "
        "(peft); auto = merged when the merge stage is published, else adapter.",
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per question (null = each task's own).")
    limit: int | None = Field(
        None, gt=0, description="Score only the first N documents of each task: a quick check, not the benchmark's score."
    )
    batch_size: int | Literal["auto"] = Field(8, description="The harness's batch size, or auto.")
    apply_chat_template: bool = Field(
        False, description="Wrap each question in the tokenizer's chat template (the harness's --apply_chat_template); "
        "published scores of multiple-choice tasks mostly leave it off.",
    )

    @field_validator("tasks", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return [t.strip() for t in value.split(",") if t.strip()] if isinstance(value, str) else value


class MergeConfig(_Section):
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="dtype of the merged weights.")


class ExportConfig(_Section):
    types: list[Literal["q8_0", "f16", "bf16"]] = Field(
        ["q8_0"], min_length=1,
        description="GGUF files the export job writes from the merged model, one per type: q8_0 = 8-bit blocks "
        "(about 1.06 bytes a weight: 8.5 GB for an 8B model, close to 16-bit quality, fast on every llama.cpp backend); "
        "f16 or bf16 = the merged weights unquantized (2 bytes a weight), a source for llama.cpp's llama-quantize "
        "(Q4_K_M and other k-quants). The Modelfile serves the first one listed.",
    )
    workers: PositiveInt | Literal["auto"] = Field(
        "auto", description="Threads converting tensors (auto = the CPUs this process may use). The files are the "
        "same byte for byte whatever the number.",
    )

    @field_validator("types")
    @classmethod
    def _each_type_once(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"{value}: list each type once")
        return value


class PushConfig(_Section):
    repo_id: str | None = Field(None, description="Hub repo to publish to, 'namespace/name'. Required to push.")
    private: bool = Field(True, description="Create the repo private.")
    what: list[Literal["adapter", "merged", "gguf"]] = Field(
        ["adapter", "merged", "gguf"], min_length=1,
        description="What to upload: the adapter, the merged model, and gguf = the export job's GGUF files, Modelfile "
        "and Ollama's template and params, when the export stage is published (make export).",
    )
    allow_foreign_repo: bool = Field(False, description="Allow pushing into an existing repo that medcot did not create.")


class TrackingConfig(_Section):
    report_to: Literal["auto", "wandb", "none"] = Field(
        "auto", description="auto = W&B online when WANDB_API_KEY is set, else W&B offline files in the run directory."
    )
    wandb_project: str = Field("Fine-tune-DeepSeek-R1-Distill-Llama-8B on Medical COT Dataset", description="W&B project.")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user).")


class RunConfig(_Section):
    run_name: str = Field(
        "deepseek-r1-distill-llama-8b-medical", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name of the run directory."
    )
    output_dir: str = Field("outputs", description="Parent folder of run directories.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    merge: MergeConfig = Field(default_factory=MergeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    lm_eval: LmEvalConfig = Field(default_factory=LmEvalConfig)
    push: PushConfig = Field(default_factory=PushConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections: a stage's identity for skip/redo decisions."""
        data = self.to_dict()
        payload = json.dumps({s: data[s] for s in sections}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`training.max_steps=30` -> (['training', 'max_steps'], 30). Values are parsed as YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not KEY=VALUE (for example training.max_steps=30)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({e.problem})") from None
    return key.strip().split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config ({error.error_count()} problem{'s' * (error.error_count() > 1)}):"]
    for err in error.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key; check its spelling (any job's `--config FILE --help` lists every key)")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  - {key}: {err['msg']}{shown}")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply KEY=VALUE overrides, validate. Raises ConfigError naming file and key."""
    source = str(path) if path else "defaults"
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file (see configs/)")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        key_path, value = parse_override(item)
        _set_path(tree, key_path, value)
    if overrides:
        source += " with overrides " + " ".join(overrides)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def save_config(config: RunConfig, path: Path) -> None:
    # redact: a token pasted into a value (a signed URL, say) is never written out.
    path.write_text(redact(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)), encoding="utf-8")


def describe(config: RunConfig) -> str:
    """Every key with its value and documentation: what `--help` prints after the usage line."""
    lines: list[str] = []

    def walk(model: BaseModel, prefix: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            key = f"{prefix}{name}"
            if isinstance(value, BaseModel):
                lines.append(f"\n[{key}]")
                walk(value, key + ".")
            else:
                if isinstance(value, list) and value and isinstance(value[0], BaseModel):
                    shown = json.dumps([v.model_dump() for v in value])
                else:
                    shown = json.dumps(value) if not isinstance(value, str) else value
                lines.append(f"  {key} = {shown}\n      {field.description or ''}")

    walk(config, "")
    return "\n".join(lines)
