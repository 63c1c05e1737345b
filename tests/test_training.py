"""Training: what the trainer is fed (masking, EOS), real steps on a tiny Llama, checkpoints and resume."""

import json

import pytest
import torch
from transformers import TrainerCallback

from medcot.config import DataConfig, load_config
from medcot.data import prepare, tokenize_example
from medcot.modeling import (
    TRAIN_MARGIN_BYTES,
    add_lora,
    load_model,
    plan_checkpointing,
    resolve_checkpointing,
    select_backend,
    training_memory_bytes,
)
from medcot.prompts import RESPONSE_MARKER
from medcot.training import complete_checkpoints, train_stage

from conftest import ROOT, SAMPLE, trainer_on


def first_batch(config, tmp_path):
    trainer, _, tok = trainer_on(config, tmp_path / "ckpt")
    return next(iter(trainer.get_train_dataloader())), tok


def supervised_spans(batch):
    """Per row: (first supervised position, last supervised position, last real position)."""
    spans = []
    for labels, mask in zip(batch["labels"], batch["attention_mask"], strict=True):
        sup = (labels != -100).nonzero().flatten()
        spans.append((int(sup[0]), int(sup[-1]), int(mask.nonzero().flatten()[-1])))
    return spans


@pytest.mark.parametrize("loss_on", ["all", "response"])
def test_last_supervised_label_of_every_row_is_eos_even_when_pad_is_eos(tiny_config, tmp_path, loss_on):
    config = load_config(None, tiny_config(f"training.loss_on={loss_on}"))
    batch, tok = first_batch(config, tmp_path)
    assert tok.pad_token_id == tok.eos_token_id  # the hard case: pad and EOS share an id
    assert batch["input_ids"].shape[0] == 2 and (batch["attention_mask"] == 0).any()  # rows of unequal length
    for row, (_, last_sup, last_real) in zip(batch["labels"], supervised_spans(batch), strict=True):
        assert last_sup == last_real
        assert row[last_sup] == tok.eos_token_id


def test_loss_on_all_supervises_every_real_token_but_the_first(tiny_config, tmp_path):
    batch, _ = first_batch(load_config(None, tiny_config("training.loss_on=all")), tmp_path)
    for labels, ids, mask in zip(batch["labels"], batch["input_ids"], batch["attention_mask"], strict=True):
        real = mask.bool()
        assert torch.equal(labels[real], ids[real])  # the model shifts labels itself
        assert (labels[~real] == -100).all()


def test_loss_on_response_masks_exactly_the_prompt_token_by_token(tiny_config, tmp_path):
    config = load_config(None, tiny_config("training.loss_on=response"))
    batch, tok = first_batch(config, tmp_path)
    data = prepare(config.data, tok, config.model.max_seq_length)
    # The sampler shuffles: match rows by content.
    expected = {tuple(tokenize_example(e, tok)["input_ids"]): tokenize_example(e, tok) for e in data.train[:4]}
    for labels, ids, mask in zip(batch["labels"], batch["input_ids"], batch["attention_mask"], strict=True):
        n = int(mask.sum())
        ref = expected[tuple(ids[:n].tolist())]
        for pos in range(n):
            want = ids[pos].item() if ref["completion_mask"][pos] else -100
            assert labels[pos].item() == want, f"position {pos}"
        prompt_text = tok.decode(ids[: ref["completion_mask"].index(1)])
        assert prompt_text.rstrip().endswith(RESPONSE_MARKER)
        assert tok.decode(ids[ref["completion_mask"].index(1):n]).startswith("<think>")


def test_tokenized_example_ends_with_the_eos_id_not_eos_text(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    data = prepare(DataConfig(path=str(SAMPLE), train_rows=3, heldout_rows=0), tok, 2048)
    enc = tokenize_example(data.train[0], tok)
    assert enc["input_ids"][-1] == tok.eos_token_id and enc["input_ids"].count(tok.eos_token_id) == 1
    assert len(enc["input_ids"]) == len(enc["completion_mask"])


def test_train_job_trains_publishes_adapter_and_summary(tiny_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = load_config(None, tiny_config("lora.use_gradient_checkpointing=auto"))
    assert train_stage(config, select_backend(config.model)) == 0
    stage = config.run_dir / "train"
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["global_step"] == 4 and [h["step"] for h in summary["losses"]] == [1, 2, 3, 4]
    assert (summary["gradient_checkpointing"], summary["gradient_checkpointing_why"]) == (False, "CPU training")
    assert summary["train_tokens"] > 0 and summary["train_tokens_per_s"] > 0 and summary["backend"] == "transformers"
    assert summary["data"]["train_rows"] == 40 and summary["data"]["dropped_total"] == 0
    assert (stage / "manifest.json").is_file() and (stage / "config.yaml").is_file()
    # The stage's time is the training's and more (the report's stage-time table), not only the publishing's.
    assert json.loads((stage / "manifest.json").read_text())["duration_s"] >= summary["train_runtime_s"] > 0
    # Four steps: the first timed from the start of training, the median of the other three gaps.
    assert summary["train_runtime_s"] >= summary["first_step_s"] > 0 and summary["median_step_s"] > 0
    base = AutoModelForCausalLM.from_pretrained(config.model.name)
    model = PeftModel.from_pretrained(base, stage / "adapter")
    assert any("lora_B" in n and p.abs().sum() > 0 for n, p in model.named_parameters())  # it learned something


def test_finished_train_stage_is_a_noop_and_a_changed_config_is_refused(tiny_config, tmp_path, caplog):
    from medcot.rundir import StageError

    config = load_config(None, tiny_config())
    runtime = select_backend(config.model)
    train_stage(config, runtime)
    manifest = (config.run_dir / "train" / "manifest.json").read_text()
    caplog.set_level("INFO")
    assert train_stage(config, runtime) == 0
    assert "nothing to do" in caplog.text
    assert (config.run_dir / "train" / "manifest.json").read_text() == manifest
    with pytest.raises(StageError, match="different config.*--force"):
        train_stage(load_config(None, tiny_config("training.learning_rate=5e-4")), runtime)


def test_checkpoints_are_marked_complete_and_kept_two(tiny_config, tmp_path):
    config = load_config(None, tiny_config("training.max_steps=6", "training.save_steps=1"))
    train_stage(config, select_backend(config.model))
    kept = complete_checkpoints(config.run_dir / "checkpoints")
    assert [p.name for p in kept] == ["checkpoint-5", "checkpoint-6"]


def test_padding_free_layout_flattens_the_micro_batch_and_computes_the_same_loss(tiny_config, tmp_path):
    batches = {}
    for layout in ("true", "false"):
        trainer, model, _ = trainer_on(load_config(None, tiny_config(f"training.padding_free={layout}")), tmp_path / layout)
        assert trainer.args.padding_free is (layout == "true")
        batch = next(iter(trainer.get_train_dataloader()))
        with torch.no_grad():
            batches[layout] = (batch, float(model(**batch).loss))
    (flat, flat_loss), (padded, padded_loss) = batches["true"], batches["false"]
    assert flat["input_ids"].shape[0] == 1 and padded["input_ids"].shape[0] == 2
    assert int((flat["position_ids"][0] == 0).sum()) == 2  # two rows, each restarting its positions
    assert flat["input_ids"].shape[1] == int(padded["attention_mask"].sum())  # no pad tokens left
    # Same rows, same supervised tokens: the layout must not change what is computed.
    assert flat_loss == pytest.approx(padded_loss, rel=1e-5)


class FirstStepGradients(TrainerCallback):
    """The trainable weights' gradients as the first optimizer step receives them (accumulated and clipped)."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


# How far two layouts of one global batch may drift apart, by the dtype the CPU trains in (model.dtype auto: bf16
# where it has AMX or AVX-512 BF16). Measured on a 2-core AMD EPYC (AVX2; bf16 forced, so emulated) with this test's
# rows: fp32 gradients 2.3e-7 apart (norm of the difference over the norm), losses 1.4e-7; bf16 gradients 3.1e-3,
# losses 2.2e-6, where bf16's rounding of activations depends on the micro-batch's shape. The adapter after a few
# AdamW steps is no measure: Adam's normalised step turns such differences in tiny gradients into full-size steps
# (5.6e-4 apart in bf16 after 4 steps).
LAYOUT_TOLERANCE = {"float32": {"grad": 1e-5, "loss": 1e-5}, "bfloat16": {"grad": 2e-2, "loss": 1e-4}}


def test_one_global_batch_in_any_layout_trains_the_same_loss_curve(tiny_config, tmp_path):
    """8 rows a step as 2 x 4 accumulated padded micro-batches (the recipe's notebook), as one padded micro-batch, or
    as one padding-free sequence: the same rows reach each optimizer step and the loss is the token mean over all of
    them, so the first step's gradients and the logged losses agree, whatever the layout."""
    curves, grads = {}, {}
    for name, micro, accum, padding_free in (("2x4", 2, 4, "false"), ("8x1", 8, 1, "false"), ("8x1-flat", 8, 1, "true")):
        config = load_config(None, tiny_config(
            f"training.per_device_train_batch_size={micro}", f"training.gradient_accumulation_steps={accum}",
            f"training.padding_free={padding_free}"))
        trainer, _, _ = trainer_on(config, tmp_path / name, rows=32)
        first = FirstStepGradients()
        trainer.add_callback(first)
        trainer.train()
        assert trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps == 8
        curves[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        grads[name] = first.grads
    dtype = select_backend(config.model).dtype_name
    tolerance = LAYOUT_TOLERANCE[dtype]
    reference = grads["2x4"]
    assert len(curves["2x4"]) == 4 and len(set(curves["2x4"])) > 1  # four steps that moved the loss
    assert any(g.norm() > 0 for g in reference.values())
    for name in ("8x1", "8x1-flat"):
        assert curves[name] == pytest.approx(curves["2x4"], rel=tolerance["loss"]), (name, dtype)
        assert grads[name].keys() == reference.keys()
        for key, ref in reference.items():
            if ref.norm() == 0:  # lora_A's gradient while lora_B is still zero
                assert grads[name][key].norm() == 0, (name, key)
            else:
                assert (grads[name][key] - ref).norm() / ref.norm() < tolerance["grad"], (name, key, dtype)


def test_padding_free_left_unset_is_padding_free_on_unsloth_for_llama_and_padded_on_transformers(tiny_config):
    from medcot.modeling import Runtime
    from medcot.training import _batch_layout

    config = load_config(None, tiny_config())
    unsloth = Runtime("unsloth", "cuda", "bfloat16", True)
    assert config.training.padding_free is None
    assert _batch_layout(config, unsloth, "llama") == {"padding_free": True}
    assert _batch_layout(config, unsloth, "gemma2") == {}  # not checked here: Unsloth's own choice (it refuses some)
    assert _batch_layout(config, select_backend(config.model), "llama") == {"padding_free": False}  # CPU: transformers
    for value in (True, False):  # as written, on either backend
        written = load_config(None, tiny_config(f"training.padding_free={str(value).lower()}"))
        assert _batch_layout(written, unsloth, "gemma2") == {"padding_free": value}


def micro_batches(config, tmp_path, rows: int):
    trainer, _, _ = trainer_on(config, tmp_path / "ckpt", rows)
    return [b["attention_mask"] for b in trainer.get_train_dataloader()]


def test_batch_rebalance_keeps_the_rows_per_step_and_pads_less_than_random_pairs(tiny_config, tmp_path):
    rebalanced = micro_batches(load_config(None, tiny_config("training.sampling=batch_rebalance")), tmp_path, 16)
    shuffled = micro_batches(load_config(None, tiny_config()), tmp_path, 16)
    accum = 2
    steps = [rebalanced[i:i + accum] for i in range(0, len(rebalanced), accum)]
    # Every optimizer step still sees batch x accumulation rows; every row is seen once in the epoch.
    assert [sum(m.shape[0] for m in step) for step in steps] == [4] * 4
    assert sum(int(m.sum()) for m in rebalanced) == sum(int(m.sum()) for m in shuffled)  # the same tokens in all

    def padding(batches):
        return sum(int((m == 0).sum()) for m in batches)

    assert padding(rebalanced) < padding(shuffled)


def test_group_by_length_sees_every_row_once_and_pads_less_than_random_pairs(tiny_config, tmp_path):
    grouped = micro_batches(load_config(None, tiny_config("training.sampling=group_by_length")), tmp_path, 16)
    shuffled = micro_batches(load_config(None, tiny_config()), tmp_path, 16)
    assert [m.shape[0] for m in grouped] == [2] * 8
    assert sum(int(m.sum()) for m in grouped) == sum(int(m.sum()) for m in shuffled)
    assert sum(int((m == 0).sum()) for m in grouped) < sum(int((m == 0).sum()) for m in shuffled)


@pytest.mark.parametrize("value", [True, False, "unsloth"])
def test_checkpointing_set_in_the_config_is_kept(tiny_config, value):
    config = load_config(None, tiny_config(f"lora.use_gradient_checkpointing={str(value).lower()}"))
    assert plan_checkpointing(config, select_backend(config.model)) == (value, "set in the config")


def test_auto_checkpointing_is_resolved_before_the_adapter_and_never_reaches_it(tiny_config):
    config = load_config(None, tiny_config("lora.use_gradient_checkpointing=auto"))
    runtime = select_backend(config.model)
    model, _ = load_model(config, runtime, for_training=True)
    # Unsloth asserts on anything but True, False and "unsloth"; peft would read "auto" as on.
    with pytest.raises(ValueError, match="resolve_checkpointing"):
        add_lora(model, config.lora, runtime, config.model.max_seq_length)
    resolved, why = resolve_checkpointing(config, runtime)
    assert (resolved.lora.use_gradient_checkpointing, why) == (False, "CPU training")
    assert config.lora.use_gradient_checkpointing == "auto"  # the config as written (its hash) is untouched
    add_lora(model, resolved.lora, runtime, config.model.max_seq_length)


def test_memory_estimate_without_checkpointing_covers_the_measured_h100_peaks():
    """The sizing behind `auto` against what the 8B model peaked at on an H100 with no checkpointing
    (bench/results): never below a measured peak (auto must not pick a run that cannot fit), at most 15% above."""
    import sys

    sys.path.insert(0, str(ROOT))
    from bench.model import R1_DISTILL_LLAMA_8B

    results = json.loads((ROOT / "bench" / "results" / "history" / "2026-11-26-h100-80gb-hbm3-levers.json").read_text())
    run = results["train"]["unsloth:false:padded"]
    params = results["build"]["params"]
    assert len(run["shapes"]) == 3
    for shape in run["shapes"]:
        estimate = training_memory_bytes(R1_DISTILL_LLAMA_8B, params, shape["batch"] * shape["seq_len"],
                                         backend="unsloth", load_in_4bit=True) - TRAIN_MARGIN_BYTES
        measured = shape["peak_memory_gib"] * 2**30
        assert measured <= estimate <= 1.15 * measured, (shape["batch"], shape["seq_len"], estimate / 2**30)


@pytest.mark.parametrize(("amx", "avx512_bf16", "dtype", "autocast"), [
    (True, True, "bfloat16", "bf16"), (False, True, "bfloat16", "bf16"), (False, False, "float32", None)])
def test_cpu_trains_in_bf16_only_where_the_processor_has_bf16_instructions(tiny_config, monkeypatch, amx, avx512_bf16,
                                                                           dtype, autocast):
    """AMX or AVX-512 BF16: bf16 weights and autocast; AVX2 alone emulates bf16, 9x slower to train: fp32 there
    (medcot.modeling.cpu_has_native_bf16)."""
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    from medcot.training import sft_config

    config = load_config(None, tiny_config())
    runtime = select_backend(config.model)
    assert runtime.dtype_name == dtype
    args = sft_config(config, runtime, ROOT / "unused")
    assert (args.bf16, args.fp16) == (autocast == "bf16", False)
    model, _ = load_model(config, runtime, for_training=True)
    assert model.dtype == getattr(torch, dtype)


def test_fp16_asked_for_on_cpu_trains_in_fp32(tiny_config):
    from medcot.training import sft_config

    config = load_config(None, tiny_config("training.precision=fp16", "model.dtype=float32"))
    args = sft_config(config, select_backend(config.model), ROOT / "unused")
    assert (args.bf16, args.fp16) == (False, False)


@pytest.mark.parametrize("setting", [None, "0"])
def test_train_job_freezes_the_imports_heap_for_the_set_up_and_thaws_it_for_train(tiny_config, monkeypatch, setting):
    """jobs/train.py: the model loads with the imports' heap frozen (out of the loaders' gc passes); train() and
    whatever follows the job see it thawed (Unsloth freezes it for train() itself); MEDCOT_GC_FREEZE=0 turns it off."""
    import gc
    import importlib.util
    import sys

    import transformers

    import medcot.training

    before = gc.get_freeze_count()  # some Pythons start with a few hundred objects frozen
    assert before <= medcot.training.SetupHeap.startup
    if setting is not None:
        monkeypatch.setenv("MEDCOT_GC_FREEZE", setting)
    seen: dict[str, int] = {}
    load, train = medcot.training.load_model, transformers.Trainer.train

    def loading(*args, **kwargs):
        seen["load"] = gc.get_freeze_count()
        return load(*args, **kwargs)

    def training(self, *args, **kwargs):
        seen["train"] = gc.get_freeze_count()
        return train(self, *args, **kwargs)

    monkeypatch.setattr(medcot.training, "load_model", loading)
    monkeypatch.setattr(transformers.Trainer, "train", training)
    spec = importlib.util.spec_from_file_location("train_job", ROOT / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    monkeypatch.setattr(sys, "argv", ["jobs/train.py", *tiny_config()])
    assert job.main() == 0
    if setting is None:
        assert seen["load"] > before + 1000
        # Thawed for train(), and afterwards no more frozen than before. Not 0: Python 3.12's collector moves immortal
        # objects to the frozen generation at every collection (375 of them on one Python 3.12.3), unfreeze or not.
        assert seen["train"] == 0 and gc.get_freeze_count() <= max(before, medcot.training.SetupHeap.startup)
    else:
        assert seen["load"] <= before and seen["train"] <= before and gc.get_freeze_count() <= before


def test_cpu_computes_the_loss_in_one_pass_and_a_gpu_keeps_trls_chunked_loss(tiny_config):
    """TRL's chunked loss recomputes the output head in the backward pass to save GPU memory; a CPU has the memory."""
    from medcot.modeling import Runtime
    from medcot.training import sft_config

    config = load_config(None, tiny_config())
    assert sft_config(config, select_backend(config.model), ROOT / "unused").loss_type == "nll"
    cuda = Runtime("transformers", "cuda", "float32", False)
    assert sft_config(config, cuda, ROOT / "unused").loss_type == "chunked_nll"
