"""The evaluate job: what it generates, what it writes, and the teacher-forced held-out loss."""

import json

import pytest
import torch

from medcot.config import load_config
from medcot.data import prepare, tokenize_example
from medcot.evaluate import evaluate_stage, heldout_token_losses
from medcot.generation import generate
from medcot.modeling import load_with_adapter, select_backend
from medcot.prompts import inference_prompt
from medcot.rundir import StageError

from conftest import MCQ_SAMPLE

ROW_KEYS = {"id", "source", "question", "reference", "options", "correct_choice", "reasoning", "answer", "raw",
            "prompt_tokens", "reasoning_tokens", "answer_tokens", "generated_tokens", "think_closed", "hit_token_limit"}


@pytest.fixture
def evaluated(tiny_config):
    config = load_config(None, tiny_config(f"eval.mcq=[{{path: {MCQ_SAMPLE}, limit: 3}}]"))
    assert evaluate_stage(config, select_backend(config.model), "before") == 0
    return config


def test_before_stage_writes_one_row_per_question_with_every_field(evaluated):
    stage = evaluated.run_dir / "eval-before"
    rows = [json.loads(line) for line in (stage / "generations.jsonl").read_text().splitlines()]
    assert [r["source"] for r in rows] == ["heldout"] * 4 + ["showcase"] + ["mcq:medqa_sample"] * 3
    assert all(set(r) == ROW_KEYS for r in rows)
    assert rows[4]["question"].startswith("A 61-year-old woman with a long history of involuntary urine loss")
    mcq = rows[-1]
    assert set(mcq["options"]) == {"A", "B", "C", "D"} and mcq["correct_choice"] in "ABCD"
    # A random model never closes its think block within 16 tokens: every answer ran into the limit.
    assert all(r["hit_token_limit"] and r["generated_tokens"] == 16 and not r["think_closed"] for r in rows)


def test_before_stage_summary_holds_the_metrics_with_intervals(evaluated):
    summary = json.loads((evaluated.run_dir / "eval-before" / "summary.json").read_text())
    assert summary["n_generated"] == 8 and summary["stage"] == "before"
    assert summary["format"]["rate"] == 0.0 and summary["format"]["ci"][1] > 0
    assert summary["hit_token_limit_rate"] == 1.0
    assert summary["heldout_loss"]["n_examples"] == 8 and summary["heldout_loss"]["perplexity"] > 1
    assert summary["mcq"]["medqa_sample"]["n"] == 3
    assert summary["generated_tokens_per_s"] > 0
    assert (evaluated.run_dir / "eval-before" / "manifest.json").is_file()


def test_after_stage_refuses_to_start_without_the_merged_model(evaluated):
    with pytest.raises(StageError, match="needs the 'merge' stage.*make merge"):
        evaluate_stage(evaluated, select_backend(evaluated.model), "after")


def test_heldout_loss_equals_the_models_own_loss_on_the_completion_tokens(tiny_config):
    config = load_config(None, tiny_config())
    runtime = select_backend(config.model)
    model, tok = load_with_adapter(config, runtime, None)
    example = prepare(config.data, tok, config.model.max_seq_length).heldout[0]
    (total, count), = heldout_token_losses(model, tok, [example], batch_size=1)
    enc = tokenize_example(example, tok)
    ids = torch.tensor([enc["input_ids"]])
    labels = ids.masked_fill(torch.tensor([enc["completion_mask"]]) == 0, -100)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).loss.item()
    assert count == sum(enc["completion_mask"])
    assert total / count == pytest.approx(reference, rel=1e-5)


def test_batched_heldout_loss_equals_one_at_a_time(tiny_config):
    config = load_config(None, tiny_config())
    model, tok = load_with_adapter(config, select_backend(config.model), None)
    rows = prepare(config.data, tok, config.model.max_seq_length).heldout[:3]
    one = [heldout_token_losses(model, tok, [r], batch_size=1)[0] for r in rows]
    batched = heldout_token_losses(model, tok, rows, batch_size=3)
    for (a, n), (b, m) in zip(one, batched, strict=True):
        assert n == m and a == pytest.approx(b, rel=1e-4)


def test_generation_stops_at_eos_and_reports_it(tiny_config):
    """A model whose EOS logit is forced up stops at once: no token limit, empty text."""
    config = load_config(None, tiny_config())
    model, tok = load_with_adapter(config, select_backend(config.model), None)
    with torch.no_grad():
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.lm_head.out_features))
        model.lm_head.bias[tok.eos_token_id] = 1e4
    out, seconds = generate(model, tok, [inference_prompt("q?"), inference_prompt("a longer question here?")],
                            max_new_tokens=8, batch_size=2)
    assert [o["generated_tokens"] for o in out] == [0, 0]
    assert not any(o["hit_token_limit"] for o in out) and seconds > 0


def test_parameter_count_reads_the_safetensors_headers(tiny_model):
    from transformers import AutoModelForCausalLM

    from medcot.modeling import parameter_count

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert parameter_count(str(tiny_model)) == sum(p.numel() for p in model.parameters())


def test_16bit_evaluation_memory_is_weights_plus_kv_cache_of_a_full_batch(tiny_config, tiny_model):
    from medcot.modeling import (
        EVAL_MARGIN_BYTES,
        PROMPT_TOKENS_BUDGET,
        eval_memory_bytes_16bit,
        parameter_count,
    )

    small = load_config(None, tiny_config("eval.batch_size=1", "eval.max_new_tokens=100"))
    large = load_config(None, tiny_config("eval.batch_size=4", "eval.max_new_tokens=100"))
    cfg = json.loads((tiny_model / "config.json").read_text())
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"]) * 2
    # One more row of KV cache (prompt budget + new tokens), one layer's prefill activations and last-position
    # logits per extra row.
    prefill = PROMPT_TOKENS_BUDGET * 2 * (6 * cfg["hidden_size"] + 3 * cfg["intermediate_size"])
    per_row = kv_per_token * (PROMPT_TOKENS_BUDGET + 100) + prefill + cfg["vocab_size"] * 16
    assert eval_memory_bytes_16bit(large) - eval_memory_bytes_16bit(small) == 3 * per_row
    assert eval_memory_bytes_16bit(small) >= parameter_count(str(tiny_model)) * 2 + EVAL_MARGIN_BYTES


def test_eval_weights_auto_takes_16bit_only_where_it_fits(tiny_config):
    from medcot.modeling import choose_eval_weights, eval_memory_bytes_16bit

    config = load_config(None, tiny_config("model.load_in_4bit=true"))
    need = eval_memory_bytes_16bit(config)
    assert choose_eval_weights(config, free_bytes=need) == "16bit"
    assert choose_eval_weights(config, free_bytes=need - 1) == "4bit"
    assert choose_eval_weights(config, free_bytes=None) == "4bit"
    pinned = load_config(None, tiny_config("model.load_in_4bit=true", "eval.weights=16bit"))
    assert choose_eval_weights(pinned, free_bytes=0) == "16bit"  # an explicit choice is kept
    trained_16bit = load_config(None, tiny_config("model.load_in_4bit=false"))
    assert choose_eval_weights(trained_16bit, free_bytes=0) == "16bit"


def test_eval_weights_auto_refuses_16bit_for_a_prequantized_checkpoint(tiny_config, tiny_model, tmp_path):
    import shutil

    from medcot.modeling import choose_eval_weights

    quantized = tmp_path / "bnb-4bit"
    shutil.copytree(tiny_model, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(cfg))
    config = load_config(None, tiny_config(f"model.name={quantized}", "model.load_in_4bit=true"))
    assert choose_eval_weights(config, free_bytes=2**50) == "4bit"


def test_cpu_evaluation_plan_keeps_the_model_settings_and_the_summary_names_the_weights(evaluated):
    from medcot.modeling import cpu_has_native_bf16, plan_eval_model

    model_config, weights = plan_eval_model(evaluated)
    assert model_config == evaluated.model and weights == "16bit"
    summary = json.loads((evaluated.run_dir / "eval-before" / "summary.json").read_text())
    assert summary["weights"] == ("bfloat16" if cpu_has_native_bf16() else "float32")


def test_generation_logs_each_decoding_step_with_rate_and_time_left_into_a_log_file(tiny_config, caplog, monkeypatch):
    """Where stderr is not a terminal (make demo > log, a container log) progress is log lines, not a silent bar;
    a batch of long answers shows its steps as they decode, not only when the batch ends."""
    import logging

    import medcot.progress

    monkeypatch.setattr(medcot.progress, "LOG_EVERY_S", 0.0)  # a line for every update
    config = load_config(None, tiny_config())
    model, tok = load_with_adapter(config, select_backend(config.model), None)
    with caplog.at_level(logging.INFO, logger="medcot.progress"):
        generate(model, tok, [inference_prompt(f"question {i}?") for i in range(3)], max_new_tokens=6, batch_size=2,
                 desc="eval-test")
    lines = [r.getMessage() for r in caplog.records if r.name == "medcot.progress"]
    # Two batches of at most 6 steps: a line per step but the last, the batch ends' rest included.
    assert [line.split(" steps")[0].rsplit(" ", 1)[1] for line in lines] == [f"{n}/12" for n in range(1, 12)]
    assert all(line.startswith("eval-test (3 answers, batch 2): ") for line in lines)
    assert "tokens/s" in lines[0] and "left" in lines[0] and "steps/s" in lines[0]


def test_heldout_loss_logs_its_progress_by_rows(tiny_config, caplog, monkeypatch):
    import logging

    import medcot.progress

    monkeypatch.setattr(medcot.progress, "LOG_EVERY_S", 0.0)
    config = load_config(None, tiny_config())
    model, tok = load_with_adapter(config, select_backend(config.model), None)
    rows = prepare(config.data, tok, config.model.max_seq_length).heldout[:3]
    with caplog.at_level(logging.INFO, logger="medcot.progress"):
        heldout_token_losses(model, tok, rows, batch_size=2)
    assert [r.getMessage().split(" rows (")[0] for r in caplog.records if r.name == "medcot.progress"] == [
        "held-out loss (3 rows, batch 2): 2/3"]


R1_DISTILL_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "vocab_size": 128256}


def test_eval_batch_auto_takes_the_rows_the_free_gpu_memory_holds_in_equal_batches(tiny_config):
    from medcot.modeling import EVAL_MARGIN_BYTES, eval_row_bytes, plan_eval_batch

    config = load_config(None, tiny_config("eval.batch_size=auto", "eval.max_new_tokens=1200"))
    per_row = eval_row_bytes(R1_DISTILL_8B, 300, 1200, 2)
    # 128 KiB of bf16 keys and values per token over 1,500 tokens, 40 MB of one layer's prefill, fp32 logits.
    assert per_row == 131072 * 1500 + 300 * 2 * (6 * 4096 + 3 * 14336) + 128256 * 16
    plan = lambda free: plan_eval_batch(config, R1_DISTILL_8B, questions=100, prompt_tokens=300, dtype_bytes=2,  # noqa: E731
                                        free_bytes=free)
    assert plan(60 * 2**30)[0] == 100  # an H100 beside 16 GB of weights: every question in one batch
    room = int((20 * 2**30 * 0.9 - EVAL_MARGIN_BYTES) // per_row)
    batch, why = plan(20 * 2**30)
    assert room == 71 and batch == 50  # two batches of 50, not 71 + 29: one compiled shape
    assert "room for 71 rows" in why and "100 questions in 2 batches of 50" in why
    assert plan(2**30)[0] == 1  # less than the margin: one row at a time, and out-of-memory splits from there


def test_eval_batch_auto_on_a_cpu_takes_up_to_32_rows_and_a_set_value_is_kept(tiny_config):
    from medcot.modeling import plan_eval_batch

    auto = load_config(None, tiny_config("eval.batch_size=auto"))
    assert plan_eval_batch(auto, R1_DISTILL_8B, questions=29, prompt_tokens=200, dtype_bytes=2, free_bytes=None) == (
        29, "CPU: up to 32 rows; 29 questions in 1 batch of 29")
    assert plan_eval_batch(auto, R1_DISTILL_8B, questions=40, prompt_tokens=200, dtype_bytes=2, free_bytes=None)[0] == 20
    fixed = load_config(None, tiny_config("eval.batch_size=6"))
    assert plan_eval_batch(fixed, R1_DISTILL_8B, questions=40, prompt_tokens=200, dtype_bytes=2, free_bytes=1) == (
        6, "set in the config")


def test_the_summary_records_the_batch_the_evaluate_job_chose_and_why(tiny_config):
    config = load_config(None, tiny_config("eval.batch_size=auto", f"eval.mcq=[{{path: {MCQ_SAMPLE}, limit: 3}}]"))
    assert evaluate_stage(config, select_backend(config.model), "before") == 0
    summary = json.loads((config.run_dir / "eval-before" / "summary.json").read_text())
    assert summary["batch_size"] == 8 and summary["batch_size_why"] == "CPU: up to 32 rows; 8 questions in 1 batch of 8"
    assert summary["loss_batch_size"] == 8 and summary["decode_warmup_seconds"] >= 0
    assert 0 < summary["decode_step_seconds"] < summary["generation_seconds"]  # 16 steps: a median of the last 12


def test_a_static_cache_fills_the_short_last_batch_and_answers_as_without_it(tiny_config):
    config = load_config(None, tiny_config())
    model, tok = load_with_adapter(config, select_backend(config.model), None)
    prompts = [inference_prompt(f"question number {i}?" * (i + 1)) for i in range(5)]
    dynamic, _ = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    model.generation_config.cache_implementation = "static"
    static, _ = generate(model, tok, prompts, max_new_tokens=6, batch_size=2)
    assert [o["text"] for o in static] == [o["text"] for o in dynamic]
    assert [o["prompt_tokens"] for o in static] == [o["prompt_tokens"] for o in dynamic]
