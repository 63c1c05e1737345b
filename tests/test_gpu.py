"""The GPU path on a small random Llama, per backend: load the base in 4-bit NF4, train with the recipe's
LoRA settings through the train job, generate with the trained adapter, save it, merge to 16 bits.

Runs where a CUDA GPU is visible (`pytest -m gpu` on the device machine); elsewhere each test is skipped
with the reason. Each backend runs in its own Python process (this file run as a script): Unsloth patches
transformers, TRL and peft when it is imported, so in a shared process the transformers backend would run
Unsloth's kernels, and Unsloth would miss the modules that other test files imported before it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "medical_o1_sample.jsonl"
TRAIN_STEPS = 6

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)"),
]
BACKENDS = [
    pytest.param("unsloth", marks=pytest.mark.skipif(
        importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed (make setup-gpu)")),
    "transformers",
]


def build_small_llama(folder: Path) -> Path:
    """4 layers, hidden 256, head size 64, bf16 weights: dimensions that bitsandbytes' 4-bit kernels and
    Unsloth's fused LoRA kernels accept (multiples of 64), with the tiny BPE tokenizer of conftest."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from conftest import build_tiny_llama

    build_tiny_llama(folder, pad_is_eos=False)  # its tokenizer stays; the model is replaced below
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def overrides(backend: str, model_dir: Path, work: Path) -> list[str]:
    """The recipe (4-bit, LoRA r 16 on all 7 projections, checkpointing auto, 8-bit AdamW) on the sample data."""
    return [
        f"model.name={model_dir}", f"model.backend={backend}", "model.load_in_4bit=true", "model.max_seq_length=1024",
        f"data.path={SAMPLE}", "data.train_rows=40", "data.heldout_rows=0",
        f"output_dir={work / 'outputs'}", f"run_name={backend}",
        "training.per_device_train_batch_size=2", "training.gradient_accumulation_steps=2",
        f"training.max_steps={TRAIN_STEPS}", "training.warmup_steps=1", "training.logging_steps=1",
        "training.save_steps=3", "training.learning_rate=2e-3", "tracking.report_to=none",
    ]


def padding_free_isolation(backend: str, model_dir: Path, work: Path, runtime, extra: tuple[str, ...] = ()) -> dict:
    """The train job's padding-free batch of 4 rows (its collator; the backend's model with LoRA, as training runs it)
    against each row alone: the largest difference of any row's logits. Beside it, what a row's logits become when
    the row before it is in its context (the two concatenated, as a layout that ignored the boundaries would see
    them): the size of the error the check must catch. Only position ids say where one row ends."""
    from medcot.config import load_config

    from conftest import trainer_on

    cfg = load_config(None, overrides(backend, model_dir, work) + [
        f"run_name={backend}-isolation", "training.padding_free=true", "training.per_device_train_batch_size=4",
        "training.gradient_accumulation_steps=1", *extra])
    trainer, model, _ = trainer_on(cfg, work / "isolation", rows=4, runtime=runtime)
    batch = {k: v.to(runtime.device) for k, v in next(iter(trainer.get_train_dataloader())).items()}
    ids, positions = batch["input_ids"], batch["position_ids"]
    starts = (positions[0] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
    model.eval()
    isolated, leaked = 0.0, float("inf")
    with torch.no_grad(), torch.autocast(runtime.device, dtype=torch.bfloat16, enabled=runtime.device == "cuda"):
        # Everything the collator gave but the labels (Unsloth may add its own packing metadata), as training passes it.
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        for i, (a, b) in enumerate(pairwise(starts)):
            alone = model(input_ids=ids[:, a:b]).logits.float()
            isolated = max(isolated, float((packed[:, a:b] - alone).abs().max()))
            if i:  # the row with the one before it in its context
                prev = starts[i - 1]
                joined = model(input_ids=ids[:, prev:b]).logits.float()[:, a - prev:]
                leaked = min(leaked, float((joined - alone).abs().max()))
    del model, trainer
    if runtime.device == "cuda":
        torch.cuda.empty_cache()
    return {"rows": len(starts) - 1, "isolated_max_diff": isolated, "leaked_max_diff": leaked}


def run_pipeline(backend: str, model_dir: Path, work: Path) -> dict:
    """Train job, inference with the adapter, merge job; in this process, which must not have imported
    transformers yet. Returns what the tests check."""
    from medcot.config import load_config
    from medcot.modeling import select_backend

    config = load_config(None, overrides(backend, model_dir, work))
    runtime = select_backend(config.model)  # imports Unsloth, when chosen, before transformers
    from medcot.generation import generate
    from medcot.merge import merge_stage
    from medcot.modeling import load_with_adapter
    from medcot.prompts import inference_prompt
    from medcot.training import train_stage

    assert train_stage(config, runtime) == 0
    train_dir = config.run_dir / "train"
    summary = json.loads((train_dir / "summary.json").read_text())

    model, tokenizer = load_with_adapter(config, runtime, train_dir / "adapter")
    outputs, _ = generate(model, tokenizer, [inference_prompt("What causes stress incontinence?")] * 2,
                          max_new_tokens=8, min_new_tokens=8, batch_size=2)
    generate_peak = torch.cuda.max_memory_allocated() / 2**30
    del model
    torch.cuda.empty_cache()

    assert merge_stage(config, runtime) == 0
    result = {
        "backend": runtime.backend,
        "summary": summary,
        "generated_tokens": [o["generated_tokens"] for o in outputs],
        "generate_peak_gib": generate_peak,
        "adapter": str(train_dir / "adapter"),
        "merged": str(config.run_dir / "merge" / "model"),
    }

    # One global batch of 8 rows in three layouts: 2 rows x 4 accumulated micro-batches, padded (Unsloth compiles
    # each block); the 8 rows in one padded micro-batch; and in one padding-free sequence. With checkpointing on
    # (offloaded on Unsloth), which `auto` turns off for a model this small. The same rows reach each optimizer
    # step in each layout, so the loss curve must not change.
    result["layouts"] = {}
    for name, micro, accum, padding_free in (("2x4-padded", 2, 4, "false"), ("8x1-padded", 8, 1, "false"),
                                             ("8x1-padding-free", 8, 1, "true")):
        cfg = load_config(None, overrides(backend, model_dir, work) + [
            f"run_name={backend}-layout-{name}", f"training.padding_free={padding_free}", "training.max_steps=3",
            f"training.per_device_train_batch_size={micro}", f"training.gradient_accumulation_steps={accum}",
            "lora.use_gradient_checkpointing=unsloth"])
        assert train_stage(cfg, runtime) == 0
        losses = json.loads((cfg.run_dir / "train" / "summary.json").read_text())["losses"]
        result["layouts"][name] = [x["loss"] for x in losses]

    result["isolation"] = padding_free_isolation(backend, model_dir, work, runtime)

    from medcot.merge import merged_model_config
    from medcot.modeling import plan_eval_model

    # evaluate-after on a GPU too small for 16 bits: the merged folder itself, loaded in 4 bits by this backend.
    cfg4 = merged_model_config(load_config(None, overrides(backend, model_dir, work) + ["eval.weights=4bit"]))
    model_config, weights = plan_eval_model(cfg4)
    model, tokenizer = load_with_adapter(cfg4, select_backend(model_config), None)
    outputs, _ = generate(model, tokenizer, [inference_prompt("Define anemia.")], max_new_tokens=8, min_new_tokens=8,
                          batch_size=1)
    result["eval4"] = {"weights": weights, "path": model_config.name, "tokens": [o["generated_tokens"] for o in outputs],
                       "quantized": any("4bit" in type(m).__name__ for m in model.modules())}
    del model
    torch.cuda.empty_cache()

    if backend == "transformers":  # the evaluate job's 16-bit plan (the Unsloth process has patched transformers)
        cfg16 = merged_model_config(load_config(None, overrides(backend, model_dir, work) + ["eval.weights=auto"]))
        model_config, weights = plan_eval_model(cfg16)
        rt16 = select_backend(model_config)
        model, tokenizer = load_with_adapter(cfg16, rt16, None)  # what evaluate-after loads: the merged folder
        prompts = [inference_prompt("What causes stress incontinence?"), inference_prompt("Define anemia.")]
        outputs, _ = generate(model, tokenizer, prompts, max_new_tokens=8, min_new_tokens=8, batch_size=2)
        # Each token the compiled static-cache decoding chose must be the argmax of a plain forward pass over
        # the same sequence (no cache, not compiled), up to bf16 rounding: the cache changes speed, not answers.
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
            mask = torch.cat([enc["attention_mask"], torch.ones_like(ids[:, enc["input_ids"].shape[1]:])], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions as generate counts them
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
        start = enc["input_ids"].shape[1]
        chosen_logits = logits[:, start - 1:-1]
        chosen = chosen_logits.gather(-1, ids[:, start:, None]).squeeze(-1)
        result["eval16"] = {"weights": weights, "load_in_4bit": rt16.load_in_4bit, "dtype": str(model.dtype),
                            "cache": model.generation_config.cache_implementation,
                            "attention": model.config._attn_implementation,
                            "has_lora": any("lora" in n for n, _ in model.named_parameters()),
                            "tokens": [o["generated_tokens"] for o in outputs],
                            "worst_margin": float((chosen_logits.max(-1).values - chosen).max())}
    result["compile_cache"] = {variable: sum(1 for f in Path(os.environ[variable]).rglob("*") if f.is_file())
                               for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    result["compile_cache_folder"] = str(Path(os.environ["TRITON_CACHE_DIR"]).parent)
    return result


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> Path:
    return build_small_llama(tmp_path_factory.mktemp("small-llama"))


@pytest.fixture(scope="module", params=BACKENDS)
def pipeline(request, small_llama, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp(f"gpu-{request.param}")
    result = work / "result.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MEDCOT_COMPILE_CACHE": str(work / "compile")}
    for variable in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "UNSLOTH_COMPILE_LOCATION"):
        env.pop(variable, None)
    proc = subprocess.run([sys.executable, __file__, request.param, str(small_llama), str(work), str(result)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"{request.param} pipeline failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    return {**json.loads(result.read_text()), "base": small_llama}


def test_backend_is_the_one_asked_for_and_base_is_4bit(pipeline):
    assert pipeline["summary"]["backend"] == pipeline["backend"]
    assert pipeline["summary"]["load_in_4bit"] is True and pipeline["summary"]["device"] == "cuda"


def test_compiled_kernels_are_kept_in_a_folder_named_for_this_gpu(pipeline):
    folder = Path(pipeline["compile_cache_folder"])
    assert folder.name.startswith(torch.cuda.get_device_name(0).replace(" ", "_"))
    assert pipeline["compile_cache"]["TORCHINDUCTOR_CACHE_DIR"] > 0 and pipeline["compile_cache"]["TRITON_CACHE_DIR"] > 0


def test_training_loss_is_finite_and_decreases(pipeline):
    losses = [entry["loss"] for entry in pipeline["summary"]["losses"]]
    assert len(losses) == TRAIN_STEPS and pipeline["summary"]["global_step"] == TRAIN_STEPS
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0], losses


def test_peak_gpu_memory_stays_small(pipeline):
    # A 4-layer model whose weights are 2 MB: anything near a GiB means something is held or upcast twice.
    assert pipeline["summary"]["peak_memory_gib"] < 1.0
    assert pipeline["generate_peak_gib"] < 1.0


def test_generation_with_the_adapter_produces_the_requested_tokens(pipeline):
    assert pipeline["generated_tokens"] == [8, 8]


def test_saved_adapter_loads_with_plain_peft_and_is_trained(pipeline):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Path(pipeline["adapter"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(pipeline["base"], dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, str(adapter))
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert len(lora_b) == 4 * 7  # every layer, all seven projections
    assert all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: nonzero means it was trained and saved


def test_auto_checkpointing_is_off_where_the_activations_fit(pipeline):
    summary = pipeline["summary"]
    assert summary["gradient_checkpointing"] is False, summary["gradient_checkpointing_why"]
    assert "GiB free" in summary["gradient_checkpointing_why"]


def test_the_batch_layouts_of_one_global_batch_train_the_same_loss_curve(pipeline):
    layouts = pipeline["layouts"]
    for layout, losses in layouts.items():
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses), (layout, losses)
    reference = layouts["2x4-padded"]
    for layout in ("8x1-padded", "8x1-padding-free"):
        # bf16 kernels on other shapes round differently; a changed gradient would move the later steps by far more.
        assert layouts[layout] == pytest.approx(reference, rel=1e-2), (layout, layouts[layout], reference)


def test_padding_free_rows_do_not_attend_to_each_other(pipeline):
    iso = pipeline["isolation"]
    assert iso["rows"] == 4, iso
    # A row in the padding-free batch must match the row alone far more closely than it would with its neighbour in
    # context (bf16 rounding on other shapes is all that may differ).
    assert iso["leaked_max_diff"] > 0 and iso["isolated_max_diff"] < 0.1 * iso["leaked_max_diff"], iso


def test_evaluate_after_loads_the_merged_folder_in_4bit_where_16bit_does_not_fit(pipeline):
    e = pipeline["eval4"]
    assert e["weights"] == "4bit" and e["path"] == pipeline["merged"] and e["quantized"], e
    assert e["tokens"] == [8]


def test_16bit_evaluation_of_the_merged_folder_decodes_with_a_compiled_static_cache(pipeline):
    if pipeline["backend"] != "transformers":
        pytest.skip("runs in the transformers process (Unsloth patches transformers when imported)")
    e = pipeline["eval16"]
    assert e["weights"] == "16bit" and e["load_in_4bit"] is False and e["dtype"] == "torch.bfloat16"
    assert e["cache"] == "static" and not e["has_lora"]
    assert e["attention"] == "medcot_sdpa_gqa_decode"  # the compiled decoding below ran the grouped path
    assert e["tokens"] == [8, 8]
    assert e["worst_margin"] < 0.1, e["worst_margin"]  # greedy picks under the static cache are argmax picks


def test_merged_16bit_model_is_base_plus_lora_delta_in_plain_transformers(pipeline):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(pipeline["merged"])
    base = AutoModelForCausalLM.from_pretrained(pipeline["base"], dtype=torch.float32)
    assert merged.dtype in (torch.float16, torch.bfloat16)
    assert not any("lora" in name for name, _ in merged.named_parameters())

    adapter = load_file(str(Path(pipeline["adapter"]) / "adapter_model.safetensors"))
    a = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_A" in k).float()
    b = next(v for k, v in adapter.items() if "layers.0.self_attn.q_proj.lora_B" in k).float()
    scale = 16 / 16  # lora_alpha / r of the recipe
    expected = base.model.layers[0].self_attn.q_proj.weight + scale * b @ a
    got = merged.model.layers[0].self_attn.q_proj.weight.float()
    assert torch.linalg.norm(got - expected) / torch.linalg.norm(b @ a) < 0.1  # 16-bit rounding of the sum

    ids = torch.tensor([[0, 5, 6, 7, 8]])
    assert torch.isfinite(merged(ids).logits).all()


TRAINER_NAMES = """
from medcot.config import ModelConfig
from medcot.modeling import select_backend

select_backend(ModelConfig(backend="unsloth"))
import trl

print(trl.SFTTrainer.__name__, trl.DPOTrainer.__name__)
"""


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is None, reason="unsloth is not installed (make setup-gpu)")
@pytest.mark.parametrize(("setting", "expected"), [(None, "UnslothSFTTrainer DPOTrainer"),
                                                   ("0", "UnslothSFTTrainer UnslothDPOTrainer")])
def test_unsloth_rewrites_trls_sft_trainer_alone_unless_told_otherwise(setting, expected, tmp_path):
    env = {**os.environ, "MEDCOT_COMPILE_CACHE": str(tmp_path / "compile"), "PYTHONPATH": str(ROOT)}
    env.pop("MEDCOT_UNSLOTH_SFT_ONLY", None)
    if setting is not None:
        env["MEDCOT_UNSLOTH_SFT_ONLY"] = setting
    proc = subprocess.run([sys.executable, "-c", TRAINER_NAMES], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.split("\n")[-2] == expected


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    backend_name, model_path, work_path, result_path = sys.argv[1:5]
    Path(result_path).write_text(json.dumps(run_pipeline(backend_name, Path(model_path), Path(work_path))))
