import base64
import io
import json
import re

import pytest
from PIL import Image

from medcot.config import RunConfig
from medcot.metrics import summarize
from medcot.report import log_to_wandb, report_if_ready, write_report
from medcot.rundir import RunDir, StageError, write_json


def row(id, source, answer, reasoning_tokens, think_closed=True, **kw):
    return {"id": id, "source": source, "question": f"Question {id}?", "reference": None, "options": None,
            "correct_choice": None, "reasoning": f"thinking about {id}", "answer": answer,
            "raw": f"thinking about {id}</think>{answer}", "prompt_tokens": 40,
            "reasoning_tokens": reasoning_tokens, "answer_tokens": len(answer.split()),
            "generated_tokens": reasoning_tokens + len(answer.split()), "think_closed": think_closed,
            "hit_token_limit": not think_closed} | kw


def eval_rows(after: bool):
    rows = [row(f"h{i}", "heldout", "stress incontinence with normal residual volume" if after else "",
                reasoning_tokens=120 + 10 * i if after else 400, think_closed=after,
                reference="stress incontinence with normal residual volume") for i in range(4)]
    rows.append(row("s0", "showcase", "<script>alert(1)</script> normal residual" if after else "unsure",
                    reasoning_tokens=150 if after else 380))
    rows += [row(f"m{i}", "mcq:medqa", "The answer is B." if after or i else "A 45-year-old...",
                 reasoning_tokens=90, options={"A": "x", "B": "y"}, correct_choice="B") for i in range(3)]
    return rows


def publish_eval(rd: RunDir, stage: str, after: bool, weights: str = "bfloat16"):
    rows = eval_rows(after)
    losses = [(20.0, 10), (18.0, 10)] if after else [(30.0, 10), (26.0, 10)]
    with rd.publishing(stage, "cfg") as (tmp, _):
        (tmp / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        write_json(tmp / "summary.json", summarize(rows, losses, generation_seconds=4.0) | {"weights": weights})


@pytest.fixture
def run_dir(tmp_path):
    rd = RunDir(tmp_path / "run")
    publish_eval(rd, "eval-before", after=False)
    with rd.publishing("train", "cfg") as (tmp, _):
        history = [{"step": s, "loss": 2.5 - 0.1 * s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 1.8}]
        write_json(tmp / "summary.json", {"log_history": history})
    publish_eval(rd, "eval-after", after=True)
    return rd.root


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_writes_markdown_html_and_valid_pngs(run_dir):
    md, page = write_report(run_dir)
    assert md == run_dir / "report" / "report.md" and md.is_file()
    assert page == run_dir / "report" / "report.html" and page.is_file()
    for name in ("training_loss.png", "lengths.png", "metrics.png"):
        with Image.open(run_dir / "report" / name) as img:
            img.verify()
            assert img.format == "PNG"


def test_report_writes_the_table_and_the_paired_tests_as_json_for_programs(run_dir):
    write_report(run_dir)
    data = json.loads((run_dir / "report" / "comparison.json").read_text())
    metrics = {row["metric"]: row for row in data["metrics"]}
    assert metrics["format rate"]["before"] is not None and metrics["format rate"]["direction"] == "higher"
    tests = {t["metric"]: t for t in data["paired_tests"]}
    assert tests["format"]["test"] == "McNemar exact" and 0 <= tests["format"]["p_value"] <= 1
    assert data["n"]["before"] == data["n"]["after"] > 0
    # bench/demo.py reads the demo's verdicts from this file by these names.
    from bench.demo import key_numbers

    numbers = key_numbers(data)
    assert {"format", "think closed", "heldout_loss", "mcq", "rouge_l"} <= set(numbers)
    assert numbers["heldout_loss"]["before_ci"] == metrics["held-out loss"]["before_ci"]


def test_html_is_self_contained_with_every_plot_embedded(run_dir):
    text = write_report(run_dir)[1].read_text(encoding="utf-8")
    pngs = embedded_pngs(text)
    assert len(pngs) == 3
    for data in pngs:
        assert Image.open(io.BytesIO(data)).size[0] > 100
    assert 'src="training_loss.png"' not in text


def test_html_and_markdown_show_metrics_with_deltas_and_intervals(run_dir):
    md, page = write_report(run_dir)
    for text in (md.read_text(encoding="utf-8"), page.read_text(encoding="utf-8")):
        for metric in ("format rate", "ROUGE-L", "MCQ medqa accuracy", "held-out loss", "held-out perplexity",
                       "median reasoning tokens", "p90 reasoning tokens", "median answer tokens"):
            assert metric in text
        assert "0.500 [0.215, 0.785]" in text and "+0.500" in text  # format rate 4/8 -> 8/8
        assert "not medical advice" in text


def test_markdown_links_the_png_files(run_dir):
    md = write_report(run_dir)[0].read_text(encoding="utf-8")
    assert "![Training loss](training_loss.png)" in md and "(lengths.png)" in md


def test_model_output_is_html_escaped(run_dir):
    page = write_report(run_dir)[1].read_text(encoding="utf-8")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_question_table_shows_showcase_first_then_heldout_with_collapsible_reasoning(run_dir):
    page = write_report(run_dir)[1].read_text(encoding="utf-8")
    questions = page[page.index("<h2>Questions</h2>"):]
    assert questions.index("Question s0?") < questions.index("Question h0?")
    assert "Question m0?" not in questions
    assert "<details><summary>reasoning · 150 tokens</summary><pre>thinking about s0</pre></details>" in questions


def test_report_without_training_summary_leaves_out_the_loss_curve(tmp_path):
    rd = RunDir(tmp_path / "run")
    publish_eval(rd, "eval-before", after=False)
    publish_eval(rd, "eval-after", after=True)
    write_report(rd.root)
    assert not (rd.root / "report" / "training_loss.png").exists()
    assert len(embedded_pngs((rd.root / "report" / "report.html").read_text(encoding="utf-8"))) == 2


def test_report_without_eval_after_says_which_job_to_run(tmp_path):
    rd = RunDir(tmp_path / "run")
    publish_eval(rd, "eval-before", after=False)
    with pytest.raises(StageError, match="eval-after.*evaluate job with --stage after"):
        write_report(rd.root)
    assert not (rd.root / "report").exists()


def test_report_is_published_with_a_manifest_of_its_inputs_into_a_chosen_folder(run_dir, tmp_path):
    out = tmp_path / "elsewhere" / "my-report"
    md, _ = write_report(run_dir, out_dir=out)
    assert md.parent == out
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert set(manifest["inputs"]) == {"eval-before", "eval-after", "train"}
    assert manifest["inputs"]["eval-after"] == RunDir(run_dir).manifest("eval-after").identity()


def test_report_if_ready_waits_for_both_evaluations_then_writes_the_report(tmp_path, caplog):
    # W&B off: wandb keeps process-wide settings from its first init, which would leak into later tests.
    config = RunConfig(output_dir=str(tmp_path), run_name="run", tracking={"report_to": "none"})
    rd = RunDir(config.run_dir)
    publish_eval(rd, "eval-before", after=False)
    caplog.set_level("INFO", logger="medcot.report")
    assert report_if_ready(config) is None
    assert "waiting for eval-after" in caplog.text
    publish_eval(rd, "eval-after", after=True)
    assert report_if_ready(config) == rd.root / "report" / "report.html"
    assert (rd.root / "report" / "report.html").is_file()
    assert "| format rate" in caplog.text


def test_log_to_wandb_offline_records_summary_and_answer_table(run_dir, tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    before = json.loads((run_dir / "eval-before" / "summary.json").read_text(encoding="utf-8"))
    after = json.loads((run_dir / "eval-after" / "summary.json").read_text(encoding="utf-8"))
    rows_before, rows_after = eval_rows(after=False), eval_rows(after=True)

    run = wandb.init(project="medcot-test")
    try:
        log_to_wandb(run, before, after, rows_before, rows_after)
        assert run.summary["eval_after/format/rate"] == after["format"]["rate"]
        assert run.summary["eval_before/mcq/medqa/ci_lo"] == before["mcq"]["medqa"]["ci"][0]
        assert run.summary["delta/format_rate"] == pytest.approx(after["format"]["rate"] - before["format"]["rate"])
    finally:
        run.finish()

    tables = list((tmp_path / "wandb-home").rglob("*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text(encoding="utf-8"))
    assert "before_answer" in table["columns"] and len(table["data"]) == len(rows_before)
    assert table["data"][4][:3] == ["showcase", "s0", "Question s0?"]


def test_report_names_the_weights_and_warns_when_the_stages_used_different_ones(run_dir, tmp_path):
    md = write_report(run_dir)[0].read_text()
    assert "Both stages generated with bfloat16 weights." in md and "Warning" not in md
    rd = RunDir(tmp_path / "mixed")
    publish_eval(rd, "eval-before", after=False, weights="4bit")
    publish_eval(rd, "eval-after", after=True, weights="bfloat16")
    md = write_report(rd.root)[0].read_text()
    assert "Warning: before generated with 4bit weights, after with bfloat16" in md


def test_report_tests_before_and_after_on_the_same_questions(run_dir):
    md = write_report(run_dir)[0].read_text()
    # Held-out rows go from an unclosed think block to a well-formed answer; the showcase and MCQ rows were
    # well-formed before and after: 4 improved, 0 worsened of 8, exact McNemar p = 2 * 0.5**4.
    assert "Paired, format: 4 of 8 questions improved, 0 worsened; exact McNemar p = 0.125." in md
    rouge = re.search(r"Paired, ROUGE-L: mean difference ([+-][0-9.]+) \[([+-][0-9.]+), ([+-][0-9.]+)\] over 4 questions", md)
    assert rouge and 0 < float(rouge[2]) <= float(rouge[1]) <= float(rouge[3])
