"""The before/after report of a run: report.md, a self-contained report.html and the PNG plots.

    from medcot.report import write_report
    md, html = write_report(Path("outputs/<run_name>"))     # -> outputs/<run_name>/report/

The evaluate job calls `report_if_ready` after each stage, so the report appears once both exist.

It reads the published eval-before and eval-after stages (summary.json, generations.jsonl) and, when
present, train/summary.json for the loss curve and lm-eval/summary.json for the public benchmarks' scores, and
publishes the report folder atomically.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure

from medcot.metrics import TABLE_HEADER, compare, format_table, paired_test_lines, paired_tests, table_cells
from medcot.rundir import DRY_RUN_DIR, PRODUCER, STAGES, RunDir, StageError, write_json
from medcot.tracking import configure_wandb

if TYPE_CHECKING:
    from medcot.config import RunConfig

log = logging.getLogger(__name__)
BANNER = ("Demo / research output, not medical advice. The answers below are written by a language model "
          "and may be wrong; do not use them to diagnose or treat anyone.")
HELDOUT_SHOWN = 5  # held-out questions shown side by side, after every showcase question
MD_ANSWER_CHARS = 600  # markdown cells stay readable; report.html has the full text
Row = dict[str, Any]


def _read_eval(rd: RunDir, stage: str) -> tuple[dict[str, Any], list[Row]]:
    folder = rd.stage(stage)
    summary, generations = folder / "summary.json", folder / "generations.jsonl"
    for path in (summary, generations):
        if not path.is_file():
            raise StageError(f"the report needs {path}, which the published '{stage}' stage lacks; "
                             f"rerun {PRODUCER[stage]} with --force")
    rows = [json.loads(line) for line in generations.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(summary.read_text(encoding="utf-8")), rows


def _paired(rows_before: Sequence[Row], rows_after: Sequence[Row]) -> list[tuple[Row, Row]]:
    """Rows answering the same question (source and id) before and after, in the before order."""
    after = {(r["source"], r["id"]): r for r in rows_after}
    return [(b, after[(b["source"], b["id"])]) for b in rows_before if (b["source"], b["id"]) in after]


def _shown(pairs: list[tuple[Row, Row]]) -> list[tuple[Row, Row]]:
    showcase = [p for p in pairs if p[0]["source"] == "showcase"]
    return showcase + [p for p in pairs if p[0]["source"] == "heldout"][:HELDOUT_SHOWN]


# ------------------------------------------------------------------------------------------- plots
# Plots use Figure directly, not pyplot: no global backend or figure registry, so no GUI is ever needed.

def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _loss_plot(log_history: Sequence[Mapping[str, Any]]) -> bytes | None:
    train = [(e["step"], e["loss"]) for e in log_history if "step" in e and "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "step" in e and "eval_loss" in e]
    if not train and not evals:
        return None
    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), marker="o", markersize=3, label="training loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="s", markersize=4, label="eval loss")
    ax.set(title="Training loss", xlabel="optimizer step", ylabel="loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def _length_plot(rows_before: Sequence[Row], rows_after: Sequence[Row]) -> bytes | None:
    if not rows_before and not rows_after:
        return None
    fig = Figure(figsize=(11, 3.8))
    for ax, key, title in zip(fig.subplots(1, 2), ("reasoning_tokens", "answer_tokens"), ("Reasoning", "Final answer"), strict=True):
        before = [int(r[key]) for r in rows_before]
        after = [int(r[key]) for r in rows_after]
        bins = np.histogram_bin_edges(before + after, bins=30)  # shared bins, so the bars compare
        for values, label in ((before, "before"), (after, "after")):
            if values:
                ax.hist(values, bins=bins, alpha=0.55, label=f"{label} (median {np.median(values):.0f})")
        ax.set(title=f"{title} length", xlabel="tokens", ylabel="answers")
        ax.legend()
    return _png(fig)


def _metric_plot(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    # Rates where higher is better and that carry intervals: one scale, one reading direction.
    shares = [r for r in rows if r["unit"] == "share" and r["direction"] == "higher"
              and r["before_ci"] and r["after_ci"]]
    if not shares:
        return None
    fig = Figure(figsize=(max(5.0, 1.4 * len(shares)), 3.8))
    ax = fig.subplots()
    x = np.arange(len(shares))
    for offset, side in ((-0.2, "before"), (0.2, "after")):
        values = [r[side] for r in shares]
        # clip: a bootstrap interval of a skewed sample can miss its own point estimate by a rounding hair
        err = np.array([[r[side] - r[f"{side}_ci"][0], r[f"{side}_ci"][1] - r[side]] for r in shares]).T.clip(min=0)
        ax.bar(x + offset, values, width=0.4, yerr=err, capsize=3, label=side)
    ax.set_xticks(x, [r["metric"] for r in shares], rotation=20, ha="right")
    ax.set(title="Main metrics (95% intervals)", ylim=(0, 1.05))
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _png(fig)


# ---------------------------------------------------------------------------------------- markdown

def _md_cell(text: str, limit: int | None = None) -> str:
    if limit and len(text) > limit:
        text = text[:limit].rstrip() + " …"
    return html.escape(text).replace("|", "\\|").replace("\n", "<br>")


def _md_answer(r: Row) -> str:
    return _md_cell(r["answer"], MD_ANSWER_CHARS) if r["answer"].strip() else "*(no final answer)*"


def _unparseable_lines(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    lines = []
    for name in sorted(set(before.get("mcq") or {}) | set(after.get("mcq") or {})):
        b, a = (before.get("mcq") or {}).get(name), (after.get("mcq") or {}).get(name)
        shown = [f"{label} {s['unparseable']}/{s['n']}" for label, s in (("before", b), ("after", a)) if s]
        lines.append(f"MCQ {name}: answers without a readable option letter (counted wrong): {', '.join(shown)}")
    return lines


BENCHMARK_HEADER = ("task", "metric", "value", "± stderr", "shots", "documents")


def _benchmarks(rd: RunDir) -> tuple[str, list[tuple[str, ...]]] | None:
    """(a line on what was scored, one row per task and metric) of the lm-eval stage; None where it did not run."""
    summary = rd.stage("lm-eval") / "summary.json"
    if not rd.is_complete("lm-eval") or not summary.is_file():
        return None
    data = json.loads(summary.read_text(encoding="utf-8"))
    limit = (f" Only the first {data['limit']} documents of each task were scored: a check, not the benchmark's score."
             if data.get("limit") else "")
    weights = "the merge job's 16-bit folder" if data["model"] == "merged" else "the base model with the trained adapter"
    line = f"Scored by lm-evaluation-harness on {weights} (make lm-eval).{limit}"
    rows = [(r["task"], r["metric"] + ("" if r["filter"] == "none" else f" ({r['filter']})"), f"{r['value']:.3f}",
             "" if r["stderr"] is None else f"{r['stderr']:.3f}", "" if r["n_shot"] is None else str(r["n_shot"]),
             "" if r["n"] is None else str(r["n"])) for r in data["scores"]]
    return line, rows


def _markdown(title: str, intro: list[str], table: str, notes: list[str], images: dict[str, str],
              shown: list[tuple[Row, Row]], benchmarks: tuple[str, list[tuple[str, ...]]] | None = None) -> str:
    parts = [f"# {title}", "", f"> **{BANNER}**", "", *intro, "", "## Metrics", "", table, ""]
    parts += [line for note in notes for line in (note, "")]
    if benchmarks:
        line, rows = benchmarks
        parts += ["## Public benchmarks (lm-evaluation-harness)", "", line, "",
                  "| " + " | ".join(BENCHMARK_HEADER) + " |", "|" + "---|" * len(BENCHMARK_HEADER)]
        parts += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows] + [""]
    if images:
        parts += ["## Plots", ""] + [f"![{alt}]({name})\n" for name, alt in images.items()]
    parts += ["## Questions", "", "Reasoning is in report.html.", "",
              "| source | question | before | after |", "|---|---|---|---|"]
    parts += [f"| {b['source']} | {_md_cell(b['question'])} | {_md_answer(b)} | {_md_answer(a)} |" for b, a in shown]
    return "\n".join(parts) + "\n"


# -------------------------------------------------------------------------------------------- html

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
.banner { background: #fff3cd; border: 1px solid #e0c060; padding: .8em 1em; border-radius: 6px; font-weight: 600; }
table { border-collapse: collapse; margin: 1em 0; width: 100%; }
th, td { border: 1px solid #ccc; padding: .4em .6em; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.better { color: #11772b; font-weight: 600; } td.worse { color: #b00020; font-weight: 600; }
.answer { white-space: pre-wrap; } pre { white-space: pre-wrap; font-size: .85em; }
img { max-width: 100%; display: block; margin: 1em 0; }
.note { color: #555; font-size: .9em; }
"""


def _html_answer(r: Row) -> str:
    answer = (f'<div class="answer">{html.escape(r["answer"])}</div>' if r["answer"].strip()
              else "<em>(no final answer: the think block never closed)</em>")
    limit = " · hit the token limit" if r.get("hit_token_limit") else ""
    return (f"{answer}<details><summary>reasoning · {r['reasoning_tokens']} tokens{limit}</summary>"
            f"<pre>{html.escape(r['reasoning'])}</pre></details>")


def _html_question(r: Row) -> str:
    out = f'<div class="answer">{html.escape(r["question"])}</div>'
    if r.get("reference"):
        out += f"<details><summary>reference answer</summary><pre>{html.escape(r['reference'])}</pre></details>"
    return out


def _html(title: str, intro: list[str], rows: list[dict[str, Any]], notes: list[str], pngs: dict[str, tuple[str, bytes]],
          shown: list[tuple[Row, Row]], benchmarks: tuple[str, list[tuple[str, ...]]] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in TABLE_HEADER)
    body = []
    for r in rows:
        cells = table_cells(r)
        css = {True: ' class="better"', False: ' class="worse"', None: ""}[r["better"]]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells[:-1])
                    + f"<td{css}>{html.escape(cells[-1])}</td></tr>")
    images = "".join(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
                     for alt, data in pngs.values())
    questions = "".join(f"<tr><td>{html.escape(b['source'])}</td><td>{_html_question(b)}</td>"
                        f"<td>{_html_answer(b)}</td><td>{_html_answer(a)}</td></tr>" for b, a in shown)
    public = ""
    if benchmarks:
        line, cells = benchmarks
        public = (f"<h2>Public benchmarks (lm-evaluation-harness)</h2><p>{html.escape(line)}</p><table><tr>"
                  + "".join(f"<th>{html.escape(h)}</th>" for h in BENCHMARK_HEADER) + "</tr>"
                  + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells)
                  + "</table>")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<div class="banner">{html.escape(BANNER)}</div>
<h1>{html.escape(title)}</h1>
{"".join(f"<p>{html.escape(line)}</p>" for line in intro)}
<h2>Metrics</h2>
<table><tr>{head}</tr>{"".join(body)}</table>
{"".join(f'<p class="note">{html.escape(line)}</p>' for line in notes)}
{public}
<h2>Plots</h2>
{images or "<p>No plots: nothing to plot.</p>"}
<h2>Questions</h2>
<table><tr><th>source</th><th>question</th><th>before</th><th>after</th></tr>{questions}</table>
</body></html>
"""


# ------------------------------------------------------------------------------------------ public

def _weights_lines(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Which weights each stage generated with; a warning when they differ (the comparison then mixes two effects)."""
    wb, wa = before.get("weights"), after.get("weights")
    if not wb or not wa:
        return []
    if wb == wa:
        return [f"Both stages generated with {wb} weights."]
    return [f"Warning: before generated with {wb} weights, after with {wa}: the difference mixes training with "
            "quantisation. Set eval.weights to one value and rerun both stages to compare like with like."]


def _after_model(after: dict[str, Any]) -> str:
    """What evaluate-after scored (summaries before the merged folder was evaluated carry no `model`)."""
    return "the merged model that is pushed" if after.get("model") == "merged" else "fine-tuned"


def write_report(run_dir: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Write report.md, report.html and the plots of a run; returns the paths of the two reports."""
    rd = RunDir(run_dir)
    manifests = {stage: rd.require(stage, "the report") for stage in ("eval-before", "eval-after")}
    before, rows_before = _read_eval(rd, "eval-before")
    after, rows_after = _read_eval(rd, "eval-after")
    inputs = {stage: m.identity() for stage, m in manifests.items()}
    log_history: list[dict[str, Any]] = []
    train_summary = rd.stage("train") / "summary.json"
    if (train := rd.manifest("train")) and train_summary.is_file():  # optional: evaluation can run untrained
        inputs["train"] = train.identity()
        log_history = json.loads(train_summary.read_text(encoding="utf-8")).get("log_history") or []
    benchmarks = _benchmarks(rd)
    if benchmarks:
        inputs["lm-eval"] = rd.require("lm-eval", "the report").identity()

    rows = compare(before, after)
    pairs = _paired(rows_before, rows_after)
    tests = paired_tests(pairs)
    shown = _shown(pairs)
    title = f"medcot before/after: {rd.root.name}"
    intro = [f"Before: base model, {before['n_generated']} answers (eval-before finished "
             f"{manifests['eval-before'].finished_at}). After: {_after_model(after)}, {after['n_generated']} answers "
             f"(eval-after finished {manifests['eval-after'].finished_at})."]
    notes = ["Intervals are 95%: Wilson for rates and accuracies, percentile bootstrap for means, medians and loss. "
             "Format = closed think block and a non-empty final answer.", *_unparseable_lines(before, after),
             *paired_test_lines(tests), *_weights_lines(before, after)]
    plots = {
        "training_loss.png": ("Training loss", _loss_plot(log_history)),
        "lengths.png": ("Length distributions before and after", _length_plot(rows_before, rows_after)),
        "metrics.png": ("Main metrics with 95% intervals", _metric_plot(rows)),
    }
    pngs = {name: (alt, data) for name, (alt, data) in plots.items() if data is not None}

    out_dir = Path(out_dir) if out_dir else rd.root / "report"
    config_hash = "+".join(inputs[s] for s in ("eval-before", "eval-after"))
    with RunDir(out_dir.parent).publishing(out_dir.name, config_hash, inputs) as (tmp, _):
        for name, (_, data) in pngs.items():
            (tmp / name).write_bytes(data)
        md = _markdown(title, intro, format_table(rows), notes, {n: alt for n, (alt, _) in pngs.items()}, shown,
                       benchmarks)
        (tmp / "report.md").write_text(md, encoding="utf-8")
        (tmp / "report.html").write_text(_html(title, intro, rows, notes, pngs, shown, benchmarks), encoding="utf-8")
        # The same numbers for programs (bench/demo.py, a CI gate): the table's rows and the paired tests.
        write_json(tmp / "comparison.json", {"metrics": rows, "paired_tests": tests,
                                             "n": {"before": before["n_generated"], "after": after["n_generated"]},
                                             "mcq": {"before": before.get("mcq") or {}, "after": after.get("mcq") or {}}})
    return out_dir / "report.md", out_dir / "report.html"


def report_if_ready(config: RunConfig) -> Path | None:
    """Write the report once both evaluations are published and print the table; None while one is missing."""
    rd = RunDir(config.run_dir)
    missing = [s for s in ("eval-before", "eval-after") if not rd.is_complete(s)]
    if missing:
        log.info("report: waiting for %s; run %s", " and ".join(missing), " and ".join(PRODUCER[s] for s in missing))
        return None
    md, page = write_report(rd.root)
    (before, rows_before), (after, rows_after) = (_read_eval(rd, s) for s in ("eval-before", "eval-after"))
    tests = paired_test_lines(paired_tests(_paired(rows_before, rows_after)))
    log.info("before/after:\n%s\n%s", format_table(compare(before, after)), "\n".join(tests))
    log.info("report: %s (markdown: %s)", page, md)
    if configure_wandb(config):
        log_comparison(config, rd.root, (before, rows_before), (after, rows_after))
    return page


def log_comparison(config: RunConfig, run_dir: Path, before: tuple[dict[str, Any], list[Row]],
                   after: tuple[dict[str, Any], list[Row]]) -> None:
    """Add both evaluations, (summary, rows) each, to the run's W&B run, which configure_wandb set up."""
    import wandb  # slow to import, and only needed when W&B is on

    run = wandb.init(project=config.tracking.wandb_project, entity=config.tracking.wandb_entity,
                     id=os.environ["WANDB_RUN_ID"], resume="allow", dir=str(run_dir), name=config.run_name)
    try:
        log_to_wandb(run, before[0], after[0], before[1], after[1])
    finally:
        run.finish()


def _flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """Numbers of a summary as 'prefix/a/b' keys; a [lo, hi] interval becomes '<key>_lo' and '<key>_hi'."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            out |= _flatten(value, name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = value
        elif isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            out[f"{name}_lo"], out[f"{name}_hi"] = value
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def log_to_wandb(run: Any, before: Mapping[str, Any], after: Mapping[str, Any],
                 rows_before: Sequence[Row], rows_after: Sequence[Row]) -> None:
    """Put both summaries and the deltas in an active W&B run's summary, and the answers side by side in a table."""
    import wandb  # only this function needs it, and it is slow to import

    run.summary.update(_flatten(before, "eval_before") | _flatten(after, "eval_after"))
    run.summary.update({f"delta/{_slug(r['metric'])}": r["delta"] for r in compare(before, after) if r["delta"] is not None})
    table = wandb.Table(columns=["source", "id", "question", "reference", "before_answer", "after_answer",
                                 "before_reasoning_tokens", "after_reasoning_tokens"])
    for b, a in _paired(rows_before, rows_after):
        table.add_data(b["source"], b["id"], b["question"], b.get("reference"), b["answer"], a["answer"],
                       b["reasoning_tokens"], a["reasoning_tokens"])
    run.log({"eval/before_after": table})


def stage_times(run_dir: Path) -> str:
    """One line per published stage with its wall time, from the manifests."""
    rd = RunDir(run_dir)
    lines = ["stage times (from each stage's start, after its job's imports):"]
    for stage in (*STAGES, DRY_RUN_DIR):
        manifest = rd.manifest(stage)
        if manifest:
            lines.append(f"  {stage:<12} {manifest.duration_s:8.1f} s   finished {manifest.finished_at}")
    return "\n".join(lines)
