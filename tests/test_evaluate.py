"""The evaluate job: what it generates, what it writes, and the teacher-forced held-out loss."""

import json

import pytest
import torch

from medcot.config import load_config
from medcot.data import prepare, tokenize_example
from medcot.evaluate import evaluate_stage, generate, heldout_token_losses
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


def test_after_stage_refuses_to_start_without_a_trained_adapter(evaluated):
    with pytest.raises(StageError, match="needs the 'train' stage.*make train"):
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
