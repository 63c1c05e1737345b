"""Data: every row validated, drops reported by reason, a deterministic held-out split, clear errors."""

import csv
import json

import pytest

from medcot.config import DataConfig
from medcot.data import DataError, prepare, read_rows, tokenize_example

from conftest import SAMPLE, sample_rows


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cfg(path, **kw) -> DataConfig:
    return DataConfig(path=str(path), **{"train_rows": None, "heldout_rows": 2, **kw})


def good(i: int) -> dict:
    return {"Question": f"Question number {i}?", "Complex_CoT": f"Reasoning {i}.", "Response": f"Answer {i}."}


def test_sample_data_has_at_least_120_valid_rows_and_nothing_dropped(tok):
    data = prepare(DataConfig(path=str(SAMPLE), train_rows=110, heldout_rows=25), tok, 2048)
    assert len(sample_rows()) >= 120
    assert (len(data.train), len(data.heldout), data.report.total_dropped) == (110, 25, 0)


@pytest.mark.parametrize("bad,reason", [
    ({"Complex_CoT": "c", "Response": "r"}, "missing question field"),
    ({"Question": None, "Complex_CoT": "c", "Response": "r"}, "null question"),
    ({"Question": "q", "Complex_CoT": "   ", "Response": "r"}, "empty cot"),
    ({"Question": "q", "Complex_CoT": "c", "Response": 42}, "non-string response"),
    ({"Question": "q", "Complex_CoT": "so </think> then", "Response": "r"}, "think tag inside the CoT"),
    ({"Question": "q ### Response: injected", "Complex_CoT": "c", "Response": "r"}, "template marker in question"),
])
def test_each_bad_row_is_dropped_and_counted_by_reason(tmp_path, tok, bad, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [good(i) for i in range(9)] + [bad])
    data = prepare(cfg(path, max_drop_fraction=0.5), tok, 2048)
    assert data.report.dropped == {reason: 1}
    assert data.report.examples[reason] == [9]


def test_duplicate_question_is_dropped_so_heldout_never_repeats_training(tmp_path, tok):
    rows = [good(i) for i in range(8)] + [good(0)]
    data = prepare(cfg(write_jsonl(tmp_path / "d.jsonl", rows), max_drop_fraction=0.5), tok, 2048)
    assert data.report.dropped == {"duplicate question": 1}
    assert {e.question for e in data.heldout}.isdisjoint({e.question for e in data.train})


def test_row_longer_than_context_is_dropped_not_truncated(tmp_path, tok):
    long = {"Question": "q?", "Complex_CoT": "word " * 3000, "Response": "r"}
    data = prepare(cfg(write_jsonl(tmp_path / "d.jsonl", [long] + [good(i) for i in range(9)]), max_drop_fraction=0.5), tok, 512)
    assert data.report.dropped == {"longer than max_seq_length (512 tokens)": 1}
    assert all(len(tokenize_example(e, tok)["input_ids"]) <= 512 for e in data.train)


def test_too_many_drops_fail_with_the_report(tmp_path, tok):
    rows = [good(i) for i in range(5)] + [{"Question": None, "Complex_CoT": "c", "Response": "r"}] * 5
    with pytest.raises(DataError, match="5 of 10 rows dropped.*max_drop_fraction"):
        prepare(cfg(write_jsonl(tmp_path / "d.jsonl", rows)), tok, 2048)


def test_no_valid_rows_is_a_clear_error(tmp_path, tok):
    rows = [{"Question": "", "Complex_CoT": "c", "Response": "r"}] * 3
    with pytest.raises(DataError, match="no valid training rows"):
        prepare(cfg(write_jsonl(tmp_path / "d.jsonl", rows), max_drop_fraction=1.0, heldout_rows=0), tok, 2048)


def test_renamed_columns_are_refused_with_the_mapping_to_set(tmp_path, tok):
    rows = [{"question": "q", "cot": "c", "answer": "a"}] * 3
    with pytest.raises(DataError, match=r"Question, Complex_CoT, Response not found.*data\.columns"):
        prepare(cfg(write_jsonl(tmp_path / "d.jsonl", rows)), tok, 2048)


def test_column_mapping_reads_other_names(tmp_path, tok):
    rows = [{"q": f"q{i}?", "c": "c", "a": "a"} for i in range(5)]
    data = prepare(cfg(write_jsonl(tmp_path / "d.jsonl", rows), columns={"question": "q", "cot": "c", "response": "a"}), tok, 2048)
    assert len(data.train) == 3 and len(data.heldout) == 2


def test_heldout_is_the_rows_right_after_the_training_window_every_time(tok):
    a = prepare(DataConfig(path=str(SAMPLE), train_rows=50, heldout_rows=10), tok, 2048)
    b = prepare(DataConfig(path=str(SAMPLE), train_rows=50, heldout_rows=10), tok, 2048)
    assert [e.row for e in a.train] == list(range(50))
    assert [e.row for e in a.heldout] == list(range(50, 60))
    assert a.train == b.train and a.heldout == b.heldout


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(good(0)) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl: line 2 is not valid JSON"):
        read_rows(str(path))


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(good(0)).encode() + b"\n\xff\xfe\x00binary\n")
    with pytest.raises(DataError, match="line 2 is not UTF-8"):
        read_rows(str(path))


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="holds no rows"):
        read_rows(str(path))


def test_missing_file_is_refused_with_what_to_set(tmp_path):
    with pytest.raises(DataError, match="does not exist.*data.path"):
        read_rows(str(tmp_path / "missing.jsonl"))


def test_csv_json_and_parquet_read_the_same_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [good(i) for i in range(3)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        assert read_rows(str(tmp_path / name))[0] == rows


def test_drop_report_logs_token_length_percentiles(tok):
    data = prepare(DataConfig(path=str(SAMPLE), train_rows=20, heldout_rows=0), tok, 2048)
    t = data.report.token_lengths
    assert 0 < t["p50"] <= t["p90"] <= t["p99"] <= t["max"]
    assert "train tokens per row: p50" in data.report.summary()
