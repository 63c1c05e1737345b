"""Multiple-choice benchmarks as they are published: rows of MedQA-USMLE, MedMCQA, PubMedQA or MMLU, recognised by
their columns (or named by `eval.mcq[].format`), read into a stem, lettered options and the correct letter.

    medqa     question, options ({letter: text} or [{key, value}]), answer_idx (letter); answer holds the text
    medmcqa   question, opa..opd, cop (the option's index: from 0 on the Hub, from 1 in the GitHub release)
    pubmedqa  question or QUESTION, the abstract (context.contexts or CONTEXTS), final_decision (yes/no/maybe)
    mmlu      question, choices (list), answer (index from 0)
    columns   question_column, options_column, answer_column (medcot's own sample: question, options, answer)

An answer may be a letter, an index, or the text of exactly one option.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcot.config import McqSourceConfig
from medcot.data import DataError, read_rows

MEDMCQA_OPTIONS = ("opa", "opb", "opc", "opd")
PUBMEDQA_LABELS = ("yes", "no", "maybe")
# The columns that identify each published shape; a row may carry more.
SIGNATURES: dict[str, tuple[str, ...]] = {
    "medqa": ("question", "options", "answer_idx"),
    "medmcqa": ("question", *MEDMCQA_OPTIONS, "cop"),
    "pubmedqa": ("final_decision",),
    "mmlu": ("question", "choices", "answer"),
    "columns": ("question", "options", "answer"),
}
FORMAT_HELP = ("set eval.mcq[].format to medqa, medmcqa, pubmedqa or mmlu, or name the columns with "
               "question_column, options_column and answer_column")


@dataclass(frozen=True)
class McqRow:
    id: str
    stem: str
    options: dict[str, str]  # letter -> text, in order
    answer: str  # the correct letter


def read_mcq(source: McqSourceConfig) -> tuple[str, list[McqRow]]:
    """(the source's name for metrics, its rows) read in the source's format."""
    rows, label = read_rows(source.path, source.name, source.split, None, source.limit)
    name = Path(source.path).stem if Path(source.path).suffix else source.path
    fmt = resolve_format(source, rows, label)
    raw = [_read_row(fmt, source, row, i, label) for i, row in enumerate(rows)]
    start = _index_start(fmt, source, [(i, answer, options) for i, (_, _, options, answer) in enumerate(raw)], label)
    return name, [McqRow(row_id, stem, options, _letter(answer, options, start, fmt, i, label))
                  for i, (row_id, stem, options, answer) in enumerate(raw)]


def resolve_format(source: McqSourceConfig, rows: list[dict[str, Any]], label: str) -> str:
    """The configured format, or the one published shape whose columns the first rows carry."""
    if source.format != "auto":
        return source.format
    if source.question_column or source.options_column or source.answer_column:
        return "columns"
    present = set().union(*(r.keys() for r in rows[:100]))
    found = [fmt for fmt, columns in SIGNATURES.items() if set(columns) <= present]
    if "medqa" in found:  # MedQA's `answer` is the option's text; its letter is `answer_idx`
        found.remove("columns")
    if len(found) == 1:
        return found[0]
    shown = ", ".join(sorted(present)) or "none"
    if found:
        raise DataError(f"{label}: the columns ({shown}) fit more than one published format ({', '.join(found)}); {FORMAT_HELP}")
    raise DataError(f"{label}: the columns ({shown}) are none of the published multiple-choice formats "
                    f"(MedQA: question, options, answer_idx; MedMCQA: question, opa..opd, cop; PubMedQA: question, "
                    f"context, final_decision; MMLU: question, choices, answer); {FORMAT_HELP}")


def _read_row(fmt: str, source: McqSourceConfig, row: dict[str, Any], i: int,
              label: str) -> tuple[str, str, dict[str, str], Any]:
    """(id, stem, options, the answer as published) of one row."""
    def get(*keys: str) -> Any:
        for key in keys:
            if key in row:
                return row[key]
        setting = "question_column, options_column and answer_column" if fmt == "columns" else "format"
        raise DataError(f"{label}: row {i} has no '{keys[0]}' column (format {fmt}; columns present: "
                        f"{', '.join(sorted(row))}); set eval.mcq[].{setting} for this source")

    row_id = str(row.get("id", row.get("pubid", i)))
    if fmt == "medqa":
        stem, options, answer = get("question"), _options(get("options"), "options", i, label), get("answer_idx")
    elif fmt == "medmcqa":
        stem, options = get("question"), _options([get(key) for key in MEDMCQA_OPTIONS], "opa..opd", i, label)
        answer = get("cop")
    elif fmt == "pubmedqa":
        context = row["context"].get("contexts") if isinstance(row.get("context"), dict) else get("CONTEXTS", "context")
        abstract = "\n".join(context) if isinstance(context, list) else str(context)
        stem = f"Abstract: {abstract}\nQuestion: {get('question', 'QUESTION')}"
        options, answer = dict(zip("ABC", PUBMEDQA_LABELS, strict=True)), get("final_decision")
    elif fmt == "mmlu":
        stem, options, answer = get("question"), _options(get("choices"), "choices", i, label), get("answer")
    else:
        column = source.options_column or "options"
        stem, answer = get(source.question_column or "question"), get(source.answer_column or "answer")
        options = _options(get(column), column, i, label)
    if not isinstance(stem, str) or not stem.strip():
        raise DataError(f"{label}: row {i}: the question is empty or not text")
    return row_id, stem, options, answer


def _options(value: Any, column: str, i: int, label: str) -> dict[str, str]:
    """{letter: text} from a mapping, a list of texts (lettered A, B, ...) or a list of {key, value} (BigBIO's MedQA)."""
    if isinstance(value, list) and value and all(isinstance(v, dict) and {"key", "value"} <= set(v) for v in value):
        value = {v["key"]: v["value"] for v in value}
    elif isinstance(value, list):
        value = {chr(ord("A") + j): text for j, text in enumerate(value)}
    if not isinstance(value, dict) or not value:
        raise DataError(f"{label}: row {i}: '{column}' must be a mapping of letters to option texts or a list of them")
    return {str(k).strip().upper(): str(v) for k, v in value.items()}


def _is_index(answer: Any, fmt: str) -> bool:
    # CSV files hold every value as text: a digit string is an index where the format publishes integers.
    return (isinstance(answer, int) and not isinstance(answer, bool)) or (
        fmt in ("medmcqa", "mmlu") and isinstance(answer, str) and answer.strip().lstrip("-").isdigit())


def _index_start(fmt: str, source: McqSourceConfig, answers: list[tuple[int, Any, dict[str, str]]], label: str) -> int:
    """Whether the source's integer answers count options from 0 or from 1.

    MMLU counts from 0. MedMCQA is published both ways (the Hub's copy from 0, the GitHub release from 1), so
    unless `answer_index_start` says, the rows decide: an index 0 means from 0, an index equal to the number of
    options means from 1."""
    if source.answer_index_start is not None or fmt == "mmlu":
        return source.answer_index_start or 0
    indices = [(i, int(a), len(options)) for i, a, options in answers if _is_index(a, fmt) and int(a) >= 0]
    if not indices:
        return 0
    zero = next((i for i, a, _ in indices if a == 0), None)
    top = next((i for i, a, n in indices if a == n), None)
    if zero is not None and top is not None:
        raise DataError(f"{label}: row {zero} gives the answer index 0 and row {top} the number of options: the rows "
                        "count options from 0 and from 1 at once; fix the file, or set eval.mcq[].answer_index_start")
    if zero is None and top is None:
        raise DataError(f"{label}: the answer indices of rows {indices[0][0]}-{indices[-1][0]} read alike whether "
                        "they count options from 0 (as the Hub's openlifescienceai/medmcqa) or from 1 (as MedMCQA's "
                        "GitHub release); set eval.mcq[].answer_index_start to 0 or 1")
    return 0 if zero is not None else 1


def _letter(answer: Any, options: dict[str, str], start: int, fmt: str, i: int, label: str) -> str:
    """The correct letter, from a letter, an index, or the text of exactly one option."""
    letters = ", ".join(options)
    if _is_index(answer, fmt):
        index = int(answer)
        if index < 0:
            hint = "; the test split of MedMCQA publishes no answers: use its validation split" if fmt == "medmcqa" else ""
            raise DataError(f"{label}: row {i} has no answer (index {index}){hint}")
        position = index - start
        if not 0 <= position < len(options):
            raise DataError(f"{label}: row {i}: answer index {index} is out of range for {len(options)} options counted "
                            f"from {start}; set eval.mcq[].answer_index_start if they count from {1 - start}")
        return list(options)[position]
    if not isinstance(answer, str) or not answer.strip():
        raise DataError(f"{label}: row {i}: the answer {answer!r} is neither a letter, an index nor an option's text")
    if answer.strip().upper() in options:
        return answer.strip().upper()
    wanted = _normal(answer)
    matches = [letter for letter, text in options.items() if _normal(text) == wanted]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise DataError(f"{label}: row {i}: answer {answer!r} is the text of options {' and '.join(matches)}; "
                        "give its letter instead")
    raise DataError(f"{label}: row {i}: answer {answer!r} is not one of the options {letters}, nor the text of one")


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()
