"""Metrics of one evaluation and the before/after comparison: pure functions of the generated rows.

`summarize` turns the evaluate job's rows (generations.jsonl) into summary.json; `compare` lines two
summaries up for the report. Intervals are 95%: Wilson for proportions, percentile bootstrap otherwise.
"""

from __future__ import annotations

import functools
import math
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from rouge_score import rouge_scorer

DEFAULT_LETTERS = ("A", "B", "C", "D", "E")
_BOOT_BLOCK = 256  # resamples drawn at once: bounds memory at 256 x n values for large n


# ---------------------------------------------------------------------------------------- intervals

def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; stays inside [0, 1], sensible at k = 0 or n."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0  # no trials: every proportion is possible
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 or k = n rounding can put a bound a hair past p; clamp so that lo <= p <= hi holds exactly.
    return max(0.0, min(center - half, p)), min(1.0, max(center + half, p))


def _bootstrap(n: int, fn: Callable[[np.ndarray], np.ndarray], n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of fn over n_boot resamples of range(n); fn maps (b, n) indices to b stats."""
    rng = np.random.default_rng(seed)
    stats = np.concatenate([fn(rng.integers(0, n, size=(min(_BOOT_BLOCK, n_boot - i), n)))
                            for i in range(0, n_boot, _BOOT_BLOCK)])
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_ci(values: Sequence[float], stat: Callable[..., Any] = np.mean, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of `stat` (a numpy reduction that takes `axis`); same seed, same interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if x.size < 2:
        v = float(stat(x))
        return v, v
    return _bootstrap(x.size, lambda idx: stat(x[idx], axis=1), n_boot, seed)


def token_weighted_loss(token_losses: Sequence[tuple[float, int]], n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean NLL per token over all examples (sum of NLL / sum of tokens) and its bootstrap interval over examples."""
    pairs = [(s, t) for s, t in token_losses if t > 0]
    if not pairs:
        raise ValueError("token_weighted_loss needs at least one example with tokens")
    nll = np.array([s for s, _ in pairs], dtype=float)
    tok = np.array([t for _, t in pairs], dtype=float)
    loss = float(nll.sum() / tok.sum())
    if len(pairs) < 2:
        return loss, (loss, loss)
    return loss, _bootstrap(len(pairs), lambda idx: nll[idx].sum(1) / tok[idx].sum(1), n_boot, seed)


# ------------------------------------------------------------------------------------------ ROUGE-L

@functools.cache
def _rouge() -> rouge_scorer.RougeScorer:
    # Imported here, by the evaluate job alone: rouge_score imports nltk, whose own imports (scipy.stats and
    # whatever else is installed) took 4.4 s of CPU on a 2-core VM, which the report, push and lm-eval jobs,
    # readers of the scores, would pay for nothing.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (stemmed). rouge_score tokenizes on ASCII letters and digits only."""
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


# ------------------------------------------------------------------------------------ option letters
# Tiers from most to least explicit; the first tier that names any valid letter decides, and two
# different letters in that tier make the answer ambiguous (None), so an answer that settles on one
# letter after discussing others ("Option A is wrong ... the answer is C") still parses.

_MARKUP = re.compile(r"[*_`]")  # markdown emphasis: "**C**" is "C"
# One letter token after a cue: "(C)", "[C]", or a bare letter that is not the start of a word ("A1c", "I'm").
_TOKEN = re.compile(r"\s*(?:\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|([A-Za-z])(?![\w'’-]))")
_SEP = re.compile(r"\s*(?:[,/&]\s*(?:(?:or|and)\s+)?|(?:or|and)\s+)", re.I)  # "B or C", "A, B and D"
# What follows a bare letter that makes it a word, not an option: the article or pronoun before a
# lowercase word or a number ("a thiazide", "A 45-year-old"), a noun modifier ("B cells"), or an
# abbreviation ("E. coli", "i.e.", "A.D."). Connectives after a letter keep it a letter ("C because", "B or C").
_WORDLIKE = re.compile(
    r"[ \t]+(?!(?:and|or|because|since|as|given|due|which|is|was|would|should)\b)[a-z0-9]|\.[ \t]*[a-z]|\.[A-Z]")
_ASSERTIONS = re.compile(
    r"\\boxed\{\s*(?:\\text(?:bf)?\{\s*)?"
    r"|\b(?:answer|option|choice)\s+(?:is|was|would\s+be|will\s+be|should\s+be)\s*:?"
    r"(?:\s*(?:therefore|thus|likely|probably|clearly|definitely)\b)?(?:\s*(?:option|choice|letter)\b)?"
    r"|\b(?:answer|option|choice)\s*[:=](?:\s*(?:option|choice|letter)\b)?"
    r"|\b(?:choose|select|pick|go\s+with)\s+(?:(?:option|choice)\s+)?",
    re.I)
_IS_CORRECT = re.compile(
    r"(?:(?:\b(?:option|choice)\s+|^[ \t]*)([A-Za-z])|\(\s*([A-Za-z])\s*\))\s+is\s+(?:the\s+)?(?:correct|right|best)\b",
    re.I | re.M)
_MENTIONS = re.compile(r"\b(?:options?|choices?)\s*[:#]?", re.I)
_LINE_LEAD = re.compile(r"^[ \t]*(?:\(\s*([A-Za-z])\s*\)|([A-Za-z])(?:[.):]|[ \t]+[-–—]))(?=\s|$)", re.M)
_PAREN_UPPER = re.compile(r"\(([A-Z])\)")
_WHOLE = re.compile(r"^\W*([A-Za-z])\W*$")


def _letters_at(text: str, pos: int) -> list[str]:
    """The letter, or list of letters ("B or C"), that starts at pos; [] when none does."""
    out: list[str] = []
    while m := _TOKEN.match(text, pos):
        # After "or"/"and"/"," a bare letter is an option ("B or C seems right") unless it is the article
        # or pronoun ("B, a drug that ...").
        if m.group(3) and _WORDLIKE.match(text, m.end()) and (not out or m.group(3) in "aiI"):
            break
        out.append((m.group(1) or m.group(2) or m.group(3)).upper())
        sep = _SEP.match(text, m.end())
        if not sep:
            break
        pos = sep.end()
    return out


def _asserted(text: str) -> list[str]:
    found = [x for m in _ASSERTIONS.finditer(text) for x in _letters_at(text, m.end())]
    return found + [(m.group(1) or m.group(2)).upper() for m in _IS_CORRECT.finditer(text)]


def _mentioned(text: str) -> list[str]:
    found = [x for m in _MENTIONS.finditer(text) for x in _letters_at(text, m.end())]
    for m in _LINE_LEAD.finditer(text):
        if m.group(1) or not _WORDLIKE.match(text, m.end(2)):
            found.append((m.group(1) or m.group(2)).upper())
    return found + [m.group(1) for m in _PAREN_UPPER.finditer(text)]


def _norm_words(s: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", s.lower())) + " "


def _by_option_text(text: str, options: Mapping[str, str]) -> list[str]:
    hay = _norm_words(text)
    hits = {k: t for k, v in options.items() if (t := _norm_words(str(v))).strip() and t in hay}
    # "Insulin" inside a stated "Insulin glargine" is not a second option.
    return [k for k, t in hits.items() if not any(t != u and t in u for u in hits.values())]


def parse_choice(text: str, letters: Sequence[str] | None = None,
                 options: Mapping[str, str] | None = None) -> str | None:
    """The option letter a final answer commits to, or None when it names none or several.

    `letters` defaults to the keys of `options`, else A-E. Without a letter, an answer that states
    exactly one option's text counts as that option.
    """
    opts = {str(k).strip().upper(): v for k, v in (options or {}).items()}
    if letters is not None:
        valid = {x.upper() for x in letters}
    else:  # given options, and only those, are the valid letters (none when the mapping is empty)
        valid = set(opts) if options is not None else set(DEFAULT_LETTERS)
    clean = _MARKUP.sub("", text or "")
    tiers: list[Callable[[], list[str]]] = [
        lambda: [m.group(1).upper()] if (m := _WHOLE.match(clean)) else [],
        lambda: _asserted(clean),
        lambda: _mentioned(clean),
        lambda: _by_option_text(clean, opts),
    ]
    for tier in tiers:
        found = {x for x in tier() if x in valid}
        if found:
            return found.pop() if len(found) == 1 else None
    return None


# ------------------------------------------------------------------------------------------ summary

def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(float(x), nd)


def _proportion(k: int, n: int) -> dict[str, Any]:
    lo, hi = wilson_interval(k, n)
    return {"rate": _r(k / n) if n else None, "ci": [_r(lo), _r(hi)] if n else None, "n": n}


def _lengths(values: list[int]) -> dict[str, Any] | None:
    if not values:
        return None
    lo, hi = bootstrap_ci(values, np.median)
    return {"median": _r(np.median(values), 1), "p90": _r(np.percentile(values, 90), 1),
            "median_ci": [_r(lo, 1), _r(hi, 1)]}


# ---- per-question outcomes: one definition each, for a stage's summary and for the paired tests

def _well_formed(r: Mapping[str, Any]) -> bool:
    return bool(r["think_closed"]) and bool(r["answer"].strip())


def _choice_correct(choice: str | None, r: Mapping[str, Any]) -> bool:
    return choice is not None and choice == str(r["correct_choice"]).strip().upper()


def _rouge_score(r: Mapping[str, Any]) -> float:
    # An empty answer (think block never closed) scores 0: not answering is not a neutral outcome.
    return rouge_l(r["answer"], r["reference"]) if r["answer"].strip() else 0.0


def _choice_accuracy(rows: list[dict[str, Any]]) -> dict[str, Any]:
    parsed = [parse_choice(r["answer"], options=r.get("options")) for r in rows]
    correct = sum(_choice_correct(p, r) for p, r in zip(parsed, rows, strict=True))
    p = _proportion(correct, len(rows))
    return {"accuracy": p["rate"], "ci": p["ci"], "n": len(rows), "correct": correct,
            "unparseable": sum(p is None for p in parsed)}


def summarize(rows: list[dict[str, Any]], heldout_token_losses: list[tuple[float, int]] | None = None,
              generation_seconds: float | None = None) -> dict[str, Any]:
    """summary.json of one evaluation: format, lengths, ROUGE-L, MCQ accuracy, held-out loss, with 95% intervals."""
    n = len(rows)
    well_formed = sum(_well_formed(r) for r in rows)
    sources: dict[str, int] = defaultdict(int)
    mcq_rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        sources[r["source"]] += 1
        if r["source"].startswith("mcq:"):
            mcq_rows[r["source"][len("mcq:"):]].append(r)
    choice_rows = [r for r in rows if r["source"] == "heldout" and r.get("options") and r.get("correct_choice")]
    rouge = [_rouge_score(r) for r in rows if r.get("reference") is not None]
    rouge_ci = bootstrap_ci(rouge) if rouge else None

    heldout_loss = None
    if heldout_token_losses and any(t > 0 for _, t in heldout_token_losses):
        loss, (lo, hi) = token_weighted_loss(heldout_token_losses)
        used = [(s, t) for s, t in heldout_token_losses if t > 0]
        heldout_loss = {"loss": _r(loss), "perplexity": _r(math.exp(loss), 3), "ci": [_r(lo), _r(hi)],
                        "perplexity_ci": [_r(math.exp(lo), 3), _r(math.exp(hi), 3)],
                        "n_examples": len(used), "n_tokens": int(sum(t for _, t in used))}

    generated = sum(int(r["generated_tokens"]) for r in rows)
    return {
        "n_generated": n,
        "sources": dict(sorted(sources.items())),
        "format": _proportion(well_formed, n),
        "think_closed_rate": _r(sum(bool(r["think_closed"]) for r in rows) / n) if n else None,
        "hit_token_limit_rate": _r(sum(bool(r["hit_token_limit"]) for r in rows) / n) if n else None,
        # Every source counts: before and after answer the same questions, so the mix is the same.
        "reasoning_tokens": _lengths([int(r["reasoning_tokens"]) for r in rows]),
        "answer_tokens": _lengths([int(r["answer_tokens"]) for r in rows]),
        "rouge_l": {"mean": _r(np.mean(rouge)), "ci": [_r(rouge_ci[0]), _r(rouge_ci[1])], "n": len(rouge)}
        if rouge else None,
        "mcq": {name: _choice_accuracy(rs) for name, rs in sorted(mcq_rows.items())},
        "exact_choice": _choice_accuracy(choice_rows) if choice_rows else None,
        "heldout_loss": heldout_loss,
        "generated_tokens": generated,
        "generation_seconds": _r(generation_seconds, 2),
        "generated_tokens_per_s": _r(generated / generation_seconds, 2) if generation_seconds else None,
    }


# --------------------------------------------------------------------------------------- comparison

def mcnemar_exact_p(only_before: int, only_after: int) -> float:
    """Two-sided exact McNemar test: p-value of the discordant pairs' split under "no change" (binomial, 1/2)."""
    n = only_before + only_after
    if n == 0:
        return 1.0
    k = min(only_before, only_after)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_bootstrap_diff(before: Sequence[float], after: Sequence[float], n_boot: int = 2000,
                          seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean of after - before over the same questions, with a 95% bootstrap interval that resamples questions."""
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if d.size == 0:
        raise ValueError("paired_bootstrap_diff needs at least one pair")
    return float(d.mean()), bootstrap_ci(d, np.mean, n_boot, seed)


def paired_tests(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Before/after on the same questions: McNemar for yes/no outcomes (format; each MCQ source's correctness),
    a paired bootstrap for ROUGE-L. Tighter than comparing two separate intervals, since each question's own
    difficulty cancels out."""
    tests: list[dict[str, Any]] = []

    def binary(name: str, outcomes: list[tuple[bool, bool]]) -> None:
        if not outcomes:
            return
        only_b = sum(b and not a for b, a in outcomes)
        only_a = sum(a and not b for b, a in outcomes)
        tests.append({"metric": name, "test": "McNemar exact", "n": len(outcomes), "improved": only_a,
                      "worsened": only_b, "p_value": float(f"{mcnemar_exact_p(only_b, only_a):.3g}")})

    def right(r: Mapping[str, Any]) -> bool:
        return _choice_correct(parse_choice(r["answer"], options=r.get("options")), r)

    binary("format", [(_well_formed(b), _well_formed(a)) for b, a in pairs])
    binary("think closed", [(bool(b["think_closed"]), bool(a["think_closed"])) for b, a in pairs])
    for source in sorted({b["source"] for b, _ in pairs if b["source"].startswith("mcq:")}):
        binary(f"MCQ {source[len('mcq:'):]} correct", [(right(b), right(a)) for b, a in pairs if b["source"] == source])
    scored = [(b, a) for b, a in pairs if b.get("reference") is not None]
    if scored:
        mean, (lo, hi) = paired_bootstrap_diff([_rouge_score(b) for b, _ in scored], [_rouge_score(a) for _, a in scored])
        tests.append({"metric": "ROUGE-L", "test": "paired bootstrap", "n": len(scored), "mean_difference": _r(mean),
                      "ci": [_r(lo), _r(hi)]})
    return tests


def paired_test_lines(tests: Sequence[Mapping[str, Any]]) -> list[str]:
    """One sentence per paired test, for the report."""
    lines = []
    for t in tests:
        if t["test"] == "McNemar exact":
            lines.append(f"Paired, {t['metric']}: {t['improved']} of {t['n']} questions improved, {t['worsened']} "
                         f"worsened; exact McNemar p = {t['p_value']:.3g}.")
        else:
            lines.append(f"Paired, {t['metric']}: mean difference {t['mean_difference']:+.3f} "
                         f"[{t['ci'][0]:+.3f}, {t['ci'][1]:+.3f}] over {t['n']} questions (bootstrap over questions).")
    return lines


def _get(summary: Mapping[str, Any], *path: str) -> Any:
    node: Any = summary
    for key in path:
        if not isinstance(node, Mapping) or node.get(key) is None:
            return None
        node = node[key]
    return node


def compare(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows of the before/after table: value and interval on each side, delta, and which direction is better.

    direction "neither" marks lengths: a change worth seeing, not a win or a loss in itself.
    """
    specs: list[tuple[str, tuple[str, ...], tuple[str, ...] | None, str, str]] = [
        # (metric, path to value, path to interval, direction, unit)
        ("format rate", ("format", "rate"), ("format", "ci"), "higher", "share"),
        ("think closed rate", ("think_closed_rate",), None, "higher", "share"),
        ("hit token limit rate", ("hit_token_limit_rate",), None, "lower", "share"),
        ("ROUGE-L", ("rouge_l", "mean"), ("rouge_l", "ci"), "higher", "share"),
    ]
    for name in sorted(set(before.get("mcq") or {}) | set(after.get("mcq") or {})):
        specs.append((f"MCQ {name} accuracy", ("mcq", name, "accuracy"), ("mcq", name, "ci"), "higher", "share"))
    specs += [
        ("held-out choice accuracy", ("exact_choice", "accuracy"), ("exact_choice", "ci"), "higher", "share"),
        ("held-out loss", ("heldout_loss", "loss"), ("heldout_loss", "ci"), "lower", "nats/token"),
        ("held-out perplexity", ("heldout_loss", "perplexity"), ("heldout_loss", "perplexity_ci"), "lower", ""),
        ("median reasoning tokens", ("reasoning_tokens", "median"), ("reasoning_tokens", "median_ci"), "neither", "tokens"),
        ("p90 reasoning tokens", ("reasoning_tokens", "p90"), None, "neither", "tokens"),
        ("median answer tokens", ("answer_tokens", "median"), ("answer_tokens", "median_ci"), "neither", "tokens"),
        ("p90 answer tokens", ("answer_tokens", "p90"), None, "neither", "tokens"),
        ("generated tokens/s", ("generated_tokens_per_s",), None, "higher", "tokens/s"),
    ]
    rows = []
    for metric, value_path, ci_path, direction, unit in specs:
        b, a = _get(before, *value_path), _get(after, *value_path)
        if b is None and a is None:
            continue
        delta = None if a is None or b is None else a - b
        better = None
        if delta and direction != "neither":
            better = (delta > 0) == (direction == "higher")
        rows.append({
            "metric": metric, "unit": unit, "direction": direction,
            "before": b, "before_ci": _get(before, *ci_path) if ci_path else None,
            "after": a, "after_ci": _get(after, *ci_path) if ci_path else None,
            "delta": _r(delta, 6), "better": better,
        })
    return rows


TABLE_HEADER = ("metric", "before [95% CI]", "after [95% CI]", "delta", "change")


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if unit in ("tokens", "tokens/s") else f"{v:.3f}"


def table_cells(row: Mapping[str, Any]) -> list[str]:
    """The formatted cells of one compare() row, in TABLE_HEADER order."""
    def with_ci(v: float | None, ci: Sequence[float] | None) -> str:
        shown = _fmt(v, row["unit"])
        return f"{shown} [{_fmt(ci[0], row['unit'])}, {_fmt(ci[1], row['unit'])}]" if v is not None and ci else shown

    delta = "-" if row["delta"] is None else ("+" if row["delta"] >= 0 else "") + _fmt(row["delta"], row["unit"])
    change = {True: "better", False: "worse", None: "same" if row["delta"] == 0 else ""}[row["better"]]
    if row["direction"] != "neither":
        change = f"{change} (goal: {row['direction']})".strip()
    unit = row["unit"]
    metric = row["metric"] if unit in ("", "share") or unit in row["metric"] else f"{row['metric']} ({unit})"
    return [metric, with_ci(row["before"], row["before_ci"]), with_ci(row["after"], row["after_ci"]), delta, change]


def format_table(rows: list[Mapping[str, Any]]) -> str:
    """compare() rows as an aligned markdown table, readable in a terminal as it is."""
    body = [list(TABLE_HEADER)] + [table_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in body) for i in range(len(TABLE_HEADER))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |" for line in body]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
