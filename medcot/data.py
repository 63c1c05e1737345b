"""Load the CoT dataset, validate every row, split off a held-out set, and report what was dropped and why.

Rows are never cut to fit: a row too long for `max_seq_length` is dropped and counted, because a
truncated row teaches the model to stop mid-answer (TRL's `max_length` would do that silently).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcot.config import ColumnsConfig, DataConfig, RunConfig
from medcot.prompts import (
    TEMPLATE_MARKERS,
    THINK_CLOSE,
    THINK_OPEN,
    answer_end_id,
    split_chat_text,
    split_training_text,
)
from medcot.rundir import hash_tree

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """A problem with the dataset that the user must fix: the message names the file, row or column."""


@dataclass(frozen=True)
class Example:
    question: str
    cot: str
    response: str
    row: int  # index in the source split, for messages and traceability


@dataclass
class DropReport:
    source: str
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)  # reason -> first few row indices
    train_rows: int = 0
    heldout_rows: int = 0
    token_lengths: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, row: int) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(row)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "dropped_total": self.total_dropped,
            "dropped": {k: {"count": v, "first_rows": self.examples[k]} for k, v in sorted(self.dropped.items())},
            "train_rows": self.train_rows,
            "heldout_rows": self.heldout_rows,
            "train_token_lengths": self.token_lengths,
        }

    def summary(self) -> str:
        lines = [
            f"data: {self.rows_read} rows read from {self.source}; kept {self.train_rows} for training and "
            f"{self.heldout_rows} held out; dropped {self.total_dropped}"
        ]
        for reason, count in sorted(self.dropped.items()):
            lines.append(f"  dropped {count:>5} {reason} (rows {', '.join(map(str, self.examples[reason]))}{', ...' if count > 5 else ''})")
        if self.token_lengths:
            t = self.token_lengths
            lines.append(f"  train tokens per row: p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}")
        return "\n".join(lines)


@dataclass
class PreparedData:
    train: list[Example]
    heldout: list[Example]
    report: DropReport


def _encoding_advice(head: bytes) -> str:
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "the file is UTF-16 (it starts with a UTF-16 byte-order mark); re-encode it as UTF-8"
    if head.startswith(b"\x1f\x8b"):
        return "the file is a gzip archive; decompress it (gunzip) first"
    return "re-encode the file as UTF-8"


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on line 1: a byte-order mark (Excel, Notepad) is not part of the JSON.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}: line {lineno} is not UTF-8 text (byte {e.start}); {_encoding_advice(raw if lineno == 1 else b'')}"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno} is not valid JSON ({e.msg} at column {e.colno}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno} is a JSON {type(obj).__name__}, expected an object with the dataset's columns")
            yield obj


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        obj = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    elif isinstance(obj, dict) and obj and all(isinstance(r, dict) for r in obj.values()):
        # Rows keyed by their id, as PubMedQA publishes them (ori_pqal.json: {PMID: row}).
        obj = [{"id": key, **row} for key, row in obj.items()]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected a JSON list of row objects (or {{\"data\": [...]}}, or rows keyed by id); "
                        "for one object per line use .jsonl")
    return obj


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}); re-encode the file as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}: not valid CSV ({e})") from None


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def read_rows(path: str, name: str | None = None, split: str = "train", revision: str | None = None,
              limit: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """Rows of a local file or a Hub dataset split (the first `limit` rows), and a label for messages."""
    local = Path(path)
    if local.suffix.lower() in LOCAL_SUFFIXES or local.exists():
        if local.is_dir():
            raise DataError(f"data.path {local} is a folder; set it to a .jsonl/.json/.parquet/.csv file in it")
        if not local.is_file():
            raise DataError(f"data file {local} does not exist; set data.path to a .jsonl/.json/.parquet/.csv file or a Hub dataset id")
        suffix = local.suffix.lower()
        if suffix == ".jsonl":
            rows: list[dict[str, Any]] = []
            for row in _read_jsonl(local):
                rows.append(row)
                if limit is not None and len(rows) >= limit:
                    break
        elif suffix == ".json":
            rows = _read_json(local)
        elif suffix == ".csv":
            rows = _read_csv(local)
        elif suffix == ".parquet":
            rows = _read_parquet(local)
        else:
            raise DataError(f"data file {local}: unsupported type {suffix or '(none)'}; use one of {', '.join(LOCAL_SUFFIXES)}")
        if not rows:
            raise DataError(f"data file {local} holds no rows")
        return rows[:limit] if limit is not None else rows, str(local)

    import datasets

    # Slicing in the split string makes `datasets` prepare only the rows we use.
    split_spec = f"{split}[:{limit}]" if limit is not None else split
    label = f"{path} ({name or 'default'}, {split_spec})"
    try:
        ds = datasets.load_dataset(path, name, split=split_spec, revision=revision)
    except (FileNotFoundError, ValueError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise DataError(f"could not load Hub dataset {label}: {e}") from None
    return ds.to_list(), label


def _check_columns(rows: list[dict[str, Any]], columns: ColumnsConfig, label: str) -> None:
    wanted = [columns.question, columns.cot, columns.response]
    present = set().union(*(r.keys() for r in rows[:100]))
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(
            f"{label}: column(s) {', '.join(missing)} not found (columns present: {', '.join(sorted(present)) or 'none'}); "
            f"map them with data.columns.question / data.columns.cot / data.columns.response"
        )


def _invalid_reason(row: dict[str, Any], columns: ColumnsConfig) -> str | None:
    for role, key in (("question", columns.question), ("cot", columns.cot), ("response", columns.response)):
        if key not in row:
            return f"missing {role} field"
        value = row[key]
        if value is None:
            return f"null {role}"
        if not isinstance(value, str):
            return f"non-string {role}"
        if not value.strip():
            return f"empty {role}"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape: no tokenizer takes it
            return f"invalid Unicode in {role}"
        if any(marker in value for marker in TEMPLATE_MARKERS):
            if role == "cot" and (THINK_CLOSE in value or THINK_OPEN in value):
                return "think tag inside the CoT"
            return f"template marker in {role}"
    return None


def percentiles(values: list[int], qs: tuple[int, ...] = (50, 90, 99)) -> dict[str, int]:
    if not values:
        return {}
    ordered = sorted(values)
    out = {f"p{q}": ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] for q in qs}
    out["max"] = ordered[-1]
    return out


def prepare(cfg: DataConfig, tokenizer, max_seq_length: int) -> PreparedData:
    """Read, validate and split. The training window is the first `train_rows` rows; the held-out window
    is the `heldout_rows` rows right after it, so the split is deterministic and never overlaps."""
    want = None if cfg.train_rows is None else cfg.train_rows + cfg.heldout_rows
    rows, label = read_rows(cfg.path, cfg.name, cfg.split, cfg.revision, want)
    _check_columns(rows, cfg.columns, label)
    report = DropReport(source=label, rows_read=len(rows))

    n_train = cfg.train_rows if cfg.train_rows is not None else max(len(rows) - cfg.heldout_rows, 0)
    seen: set[str] = set()
    train: list[Example] = []
    heldout: list[Example] = []
    lengths: list[int] = []
    for index, row in enumerate(rows):
        reason = _invalid_reason(row, cfg.columns)
        if reason:
            report.drop(reason, index)
            continue
        ex = Example(row[cfg.columns.question].strip(), row[cfg.columns.cot].strip(), row[cfg.columns.response].strip(), index)
        key = " ".join(ex.question.lower().split())
        if key in seen:
            # A duplicate in the held-out window would leak training data into the evaluation.
            report.drop("duplicate question", index)
            continue
        seen.add(key)
        n_tokens = len(tokenize_example(ex, tokenizer, cfg.template)["input_ids"])
        if n_tokens > max_seq_length:
            report.drop(f"longer than max_seq_length ({max_seq_length} tokens)", index)
            continue
        if index < n_train:
            train.append(ex)
            lengths.append(n_tokens)
        else:
            heldout.append(ex)

    report.train_rows, report.heldout_rows = len(train), len(heldout)
    report.token_lengths = percentiles(lengths)
    if not train:
        raise DataError(f"{label}: no valid training rows left after validation.\n{report.summary()}")
    if report.rows_read and report.total_dropped / report.rows_read > cfg.max_drop_fraction:
        raise DataError(
            f"{label}: {report.total_dropped} of {report.rows_read} rows dropped, more than data.max_drop_fraction="
            f"{cfg.max_drop_fraction}; fix the data or the column mapping, or raise the limit.\n{report.summary()}"
        )
    if cfg.heldout_rows and not heldout:
        log.warning("data: no held-out rows (the split has only %d rows); evaluation will use the showcase questions only", len(rows))
    return PreparedData(train=train, heldout=heldout, report=report)


def tokenize_example(ex: Example, tokenizer, template: str = "recipe") -> dict[str, list[int]]:
    """input_ids of the training text with its end token last, and a mask of the completion tokens.

    The end token (the tokenizer's EOS for the recipe, the end of the assistant's turn for the chat template) is
    appended as a token, not as text, so the model is supervised to emit exactly the id that generation stops on.
    Recipe: the completion starts where the tokenized prompt and the tokenized whole text diverge (the prompt ends on a
    newline, so this is the token after `### Response:\\n`). Chat: the prompt's tokens are the rendered serving
    prompt's, as a server tokenizes it (without adding special tokens: the template writes its own), and the
    completion is tokenized after them.
    """
    end = answer_end_id(template, tokenizer)
    if template == "chat":
        prompt, completion = split_chat_text(tokenizer, ex.question, ex.cot, ex.response)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [end]
        return {"input_ids": prompt_ids + completion_ids,
                "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}
    prompt, completion = split_training_text(ex.question, ex.cot, ex.response, eos_token="")
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = tokenizer(prompt + completion)["input_ids"] + [end]
    n_prompt = 0
    while n_prompt < len(prompt_ids) and prompt_ids[n_prompt] == ids[n_prompt]:
        n_prompt += 1
    return {"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * (len(ids) - n_prompt)}


def data_inputs(config: RunConfig) -> dict[str, str]:
    """Content hash of a local data file, so an edited file is not mistaken for the one trained or evaluated on."""
    path = Path(config.data.path)
    return {"data": hash_tree(path)} if path.is_file() else {}
