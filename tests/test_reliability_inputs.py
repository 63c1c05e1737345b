"""Bad input: every broken dataset and config of tests/corpus/, given to the real job, is refused with a
message naming the file, line, row or key, exit status 1 (data) or 2 (config), and no traceback; bad rows
among good ones are dropped and reported by reason and row, never cut or passed on silently. Property-based
tests cover the prompt formatting, the answer parsing and row validation on arbitrary input.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability import assert_clean_failure, job_env, run, single_thread

from medcot.config import DataConfig
from medcot.data import DataError, prepare, read_rows
from medcot.metrics import parse_choice
from medcot.prompts import (
    TEMPLATE_MARKERS,
    TRAIN_TEMPLATE,
    inference_prompt,
    parse_generation,
    split_training_text,
)

CORPUS = Path(__file__).parent / "corpus"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield



def train_args(tiny_model, tmp_path, *extra: str) -> list[str]:
    return [f"model.name={tiny_model}", "model.max_seq_length=256", "model.load_in_4bit=false",
            "data.train_rows=8", "data.heldout_rows=2", f"output_dir={tmp_path / 'out'}", "run_name=bad",
            "lora.use_gradient_checkpointing=false", "training.max_steps=1", "training.warmup_steps=0",
            "training.optim=adamw_torch", "tracking.report_to=none", *extra]


# ---- broken datasets, through jobs/train.py ---------------------------------------------------------------

# (data.path, phrases the message must hold). Each is one bad input.
BAD_DATA = [
    ("malformed_line.jsonl", ["malformed_line.jsonl: line 4 is not valid JSON", "fix or remove that line"]),
    ("latin1.jsonl", ["latin1.jsonl: line 3 is not UTF-8 text", "re-encode the file as UTF-8"]),
    ("utf16_bom.jsonl", ["utf16_bom.jsonl: line 1 is not UTF-8 text", "UTF-16", "re-encode it as UTF-8"]),
    ("gzipped.jsonl", ["gzipped.jsonl: line 1 is not UTF-8", "gzip archive; decompress it"]),
    ("array_row.jsonl", ["array_row.jsonl: line 3 is a JSON list, expected an object"]),
    ("renamed_columns.jsonl", ["renamed_columns.jsonl: column(s) Question, Complex_CoT, Response not found",
                               "columns present: answer, cot, question", "data.columns.question"]),
    ("missing_column.jsonl", ["missing_column.jsonl: column(s) Complex_CoT not found", "data.columns.cot"]),
    ("nulls.jsonl", ["nulls.jsonl: no valid training rows", "dropped    10 null response (rows 0, 1, 2, 3, 4, ...)"]),
    ("numbers.jsonl", ["numbers.jsonl: no valid training rows", "dropped    10 non-string question"]),
    ("empty.jsonl", ["empty.jsonl holds no rows"]),
    ("blank_lines.jsonl", ["blank_lines.jsonl holds no rows"]),
    ("not_a_list.json", ["not_a_list.json: expected a JSON list of row objects"]),
    ("truncated.json", ["truncated.json: not valid JSON", "line 1, column"]),
    ("not_parquet.parquet", ["not_parquet.parquet: not a readable Parquet file"]),
    ("notes.txt", ["notes.txt: unsupported type .txt", ".jsonl"]),
    ("missing.jsonl", ["missing.jsonl does not exist", "set data.path"]),
    (".", ["is a folder; set it to a .jsonl"]),
    ("mixed_bad_rows.jsonl", ["mixed_bad_rows.jsonl: 4 of 10 rows dropped, more than data.max_drop_fraction=0.2",
                              "null question (rows 2)", "template marker in question (rows 8)"]),
    ("someone/no-such-dataset", ["could not load Hub dataset someone/no-such-dataset", "OfflineModeIsEnabled"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("path,phrases", BAD_DATA, ids=[p for p, _ in BAD_DATA])
def test_a_broken_dataset_is_refused_with_where_and_why_and_no_traceback(tiny_model, tmp_path, path, phrases):
    data = CORPUS / path if "/" not in path else path
    if path == ".":
        data = CORPUS

    done = run("train", train_args(tiny_model, tmp_path, f"data.path={data}"), tmp_path, timeout=120)

    assert_clean_failure(done, *phrases, codes=(1,))
    assert not (tmp_path / "out" / "bad" / "train").exists()


@pytest.mark.slow
def test_bad_rows_among_good_ones_are_dropped_and_reported_by_reason_and_row(tiny_model, tmp_path):
    done = run("train", train_args(tiny_model, tmp_path, f"data.path={CORPUS / 'mixed_bad_rows.jsonl'}",
                                   "data.train_rows=16", "data.heldout_rows=4", "data.max_drop_fraction=0.5"), tmp_path)

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "20 rows read" in done.stderr and "kept 9 for training and 2 held out; dropped 9" in done.stderr
    report = json.loads((tmp_path / "out" / "bad" / "train" / "summary.json").read_text())["data"]
    assert {reason: d["first_rows"] for reason, d in report["dropped"].items()} == {
        "null question": [2], "non-string response": [4], "empty cot": [6], "template marker in question": [8],
        "think tag inside the CoT": [10], "longer than max_seq_length (256 tokens)": [12],
        "duplicate question": [14], "invalid Unicode in question": [16], "missing response field": [18],
    }
    for reason in report["dropped"]:
        assert reason in done.stderr


def test_a_utf8_byte_order_mark_is_read_like_plain_utf8():
    plain = [json.loads(line) for line in (CORPUS / "utf8_bom.jsonl").read_bytes()[3:].decode().splitlines()]
    assert read_rows(str(CORPUS / "utf8_bom.jsonl"))[0] == plain
    assert read_rows(str(CORPUS / "utf8_bom.csv"))[0] == plain


def test_a_huge_jsonl_is_read_only_as_far_as_the_rows_used(tiny_model, tmp_path):
    """50,000 rows (~14 MB) with a broken last line: reading 20 rows takes milliseconds and little memory,
    and never reaches the broken line."""
    from transformers import AutoTokenizer

    row = {"Question": "A patient with fever and cough: next step? " * 3, "Complex_CoT": "Think about infection. " * 5,
           "Response": "Examine the chest."}
    huge = tmp_path / "huge.jsonl"
    with huge.open("w", encoding="utf-8") as f:
        for i in range(50_000):
            f.write(json.dumps({**row, "Question": f"{i}: {row['Question']}"}) + "\n")
        f.write('{"Question": "cut off\n')
    assert huge.stat().st_size > 10_000_000
    tok = AutoTokenizer.from_pretrained(tiny_model)

    tracemalloc.start()
    t0 = time.monotonic()
    data = prepare(DataConfig(path=str(huge), train_rows=16, heldout_rows=4), tok, 256)
    seconds = time.monotonic() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert (data.report.rows_read, len(data.train), len(data.heldout)) == (20, 16, 4)
    assert seconds < 5 and peak < 8 * 2**20
    with pytest.raises(DataError, match="line 50001 is not valid JSON"):  # the whole file would be refused
        prepare(DataConfig(path=str(huge), train_rows=None, heldout_rows=4), tok, 256)


# ---- broken configs ----------------------------------------------------------------------------------------

# (config file or None, extra overrides, phrases). Config errors exit 2 before anything heavy loads.
BAD_CONFIGS = [
    ("unknown_key.yaml", [], ["unknown_key.yaml", "lora.lora_alpa: unknown key"]),
    ("wrong_type.yaml", [], ["wrong_type.yaml", "training.max_steps", "'sixty'"]),
    ("bad_yaml.yaml", [], ["bad_yaml.yaml: not valid YAML", "line 4"]),
    ("top_level_list.yaml", [], ["top_level_list.yaml: the top level must be a mapping of sections, got list"]),
    ("impossible_value.yaml", [], ["impossible_value.yaml: invalid config (2 problems)", "lora.r: Input should be greater than 0",
                                   "warmup_steps (50) exceeds max_steps (10)"]),
    ("latin1.yaml", [], ["latin1.yaml: not valid YAML", "can't decode byte 0xe9"]),
    ("missing.yaml", [], ["config file", "missing.yaml does not exist"]),
    (None, ["training.max_steps"], ["override 'training.max_steps' is not KEY=VALUE"]),
    (None, ["lora.target_modules=[q_proj"], ["override 'lora.target_modules=[q_proj': value is not valid YAML"]),
    (None, ["training.max_steps=3", "training.max_steps.value=3"],
     ["override training.max_steps.value: max_steps is a value, not a section"]),
    (None, ["run_name=../escape"], ["run_name: String should match pattern"]),
]


@pytest.mark.parametrize("config,extra,phrases", BAD_CONFIGS, ids=[c or e[0] for c, e, _ in BAD_CONFIGS])
def test_a_broken_config_is_refused_with_the_file_and_key_and_no_traceback(tmp_path, config, extra, phrases):
    args = (["--config", str(CORPUS / config)] if config else []) + extra

    done = run("train", args, tmp_path, timeout=60)

    assert_clean_failure(done, *phrases, codes=(2,))


@pytest.mark.slow
def test_a_lora_target_the_model_lacks_is_refused_before_any_weight_loads(tiny_model, tmp_path):
    weightless = tmp_path / "model"
    weightless.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model / name, weightless)  # no model.safetensors: loading weights would fail otherwise

    done = run("train", ["--config", str(CORPUS / "missing_target_module.yaml"),
                         *train_args(weightless, tmp_path, "data.path=never-read.jsonl")], tmp_path, timeout=120)

    assert_clean_failure(done, "lora.target_modules: query_key_value not in", "its linear layers: ", "q_proj",
                         codes=(1,))


@pytest.mark.slow
def test_a_model_path_that_does_not_exist_is_refused_by_name(tmp_path):
    done = run("train", ["model.name=/nonexistent/model", f"output_dir={tmp_path}"], tmp_path, timeout=120)

    assert_clean_failure(done, "model.name '/nonexistent/model': cannot read its config", codes=(1,))


@pytest.mark.slow
@pytest.mark.parametrize("source,phrases", [
    ("mcq_answer_not_an_option.jsonl", ["mcq_answer_not_an_option.jsonl: row 1: answer 'E' is not one of the options A, B, C, D"]),
    ("mcq_renamed_options.jsonl", ["mcq_renamed_options.jsonl: the columns (alternatives, answer, question) are none of "
                                   "the published multiple-choice formats", "set eval.mcq[].format to medqa"]),
])
def test_a_broken_multiple_choice_source_is_refused_by_the_evaluate_job(tiny_model, tmp_path, source, phrases):
    from conftest import SAMPLE

    args = ["--stage", "before", *train_args(tiny_model, tmp_path, f"data.path={SAMPLE}", "model.max_seq_length=1024",
                                             f"eval.mcq=[{{path: {CORPUS / source}}}]")]
    done = run("evaluate", args, tmp_path, env=job_env(tmp_path), timeout=120)

    assert_clean_failure(done, *phrases, codes=(1,))
    assert not (tmp_path / "out" / "bad" / "eval-before").exists()


# ---- properties ----------------------------------------------------------------------------------------------

def _squash(text: str) -> str:
    return "".join(text.split())


_TAGGY = st.lists(st.sampled_from(["<think>", "</think>", "<think", "think>", "</", " ", "\n", "\t", "answer",
                                   "A", "### Response:"]) | st.text(max_size=8), max_size=20).map("".join)


@given(st.text() | _TAGGY)
def test_parse_generation_never_raises_and_reasoning_plus_answer_cover_the_text(text):
    parsed = parse_generation(text)

    body = text.lstrip()[len("<think>"):] if text.lstrip().startswith("<think>") else text
    assert parsed.think_closed == ("</think>" in body)
    assert "</think>" not in parsed.reasoning
    assert parsed.reasoning == parsed.reasoning.strip() and parsed.answer == parsed.answer.strip()
    # Nothing is lost and nothing invented: only whitespace and the one closing tag are taken out.
    assert _squash(body) == _squash(parsed.reasoning + ("</think>" if parsed.think_closed else "") + parsed.answer)
    assert parsed.well_formed == (parsed.think_closed and parsed.answer != "")


_FIELD = st.text() | st.sampled_from(TEMPLATE_MARKERS).flatmap(lambda m: st.text().map(lambda t: t + m + t))


@given(question=_FIELD, cot=_FIELD, response=_FIELD, eos=st.sampled_from(["", "</s>", "<|end▁of▁sentence|>"]))
def test_the_prompt_ends_at_the_templates_own_response_marker_whatever_the_fields_hold(question, cot, response, eos):
    prompt, completion = split_training_text(question, cot, response, eos)

    assert prompt + completion == TRAIN_TEMPLATE.format(question, cot, response) + eos
    assert prompt + "<think>" == inference_prompt(question)  # the same prompt the model answers at evaluation
    assert completion.startswith("<think>\n") and completion.endswith(response + eos)


@given(st.text(), st.dictionaries(st.sampled_from("ABCDEFabcdef "), st.text(), max_size=6))
def test_parse_choice_never_raises_and_returns_an_option_or_none(text, options):
    choice = parse_choice(text, options=options)
    assert choice is None or choice in {str(k).strip().upper() for k in options}


_JSON_VALUE = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | _FIELD | st.just("\ud800") \
    | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
_ROW = st.dictionaries(st.sampled_from(["Question", "Complex_CoT", "Response", "question", "extra"]), _JSON_VALUE)
_GOOD_ROW = st.builds(lambda i: {"Question": f"q{i}?", "Complex_CoT": "c", "Response": "r"}, st.integers(0, 10**6))


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(_ROW | _GOOD_ROW, min_size=1, max_size=12), heldout=st.integers(0, 3))
def test_every_row_is_kept_or_dropped_with_a_reason_and_nothing_else_escapes(tok, rows, heldout):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        try:
            data = prepare(DataConfig(path=str(path), train_rows=None, heldout_rows=heldout, max_drop_fraction=1.0), tok, 256)
        except DataError as e:
            assert str(path) in str(e)
            return
    report = data.report
    assert report.rows_read == len(rows)
    assert len(data.train) + len(data.heldout) + report.total_dropped == len(rows)
    kept = {e.row for e in data.train + data.heldout}
    dropped = {r for rows_ in report.examples.values() for r in rows_}
    assert kept.isdisjoint(dropped)
    for ex in data.train + data.heldout:
        assert all(isinstance(v, str) and v.strip() for v in (ex.question, ex.cot, ex.response))


@given(junk=st.binary(min_size=1, max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b),
       where=st.integers(0, 5))
def test_a_junk_line_anywhere_is_refused_by_line_number_or_read_as_a_row(junk, where):
    good = [json.dumps({"Question": f"q{i}?", "Complex_CoT": "c", "Response": "r"}).encode() for i in range(6)]
    lines = good[:where] + [junk] + good[where:]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        try:
            rows, _ = read_rows(str(path))
        except DataError as e:
            assert f"line {where + 1} " in str(e)
            return
    assert len(rows) in (6, 7)  # junk that is blank is skipped; junk that is a JSON object is a row
