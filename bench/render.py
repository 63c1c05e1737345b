"""BENCHMARKS.md from the results files: one section per topic, each with the date, machine and versions its figures
were measured on, the command that measures them again, the figures and their targets. The hand-written end of the
page, from `## Notes` on (what to keep in mind, and the history of the changes that moved a number), is kept.

    python3 bench/run.py --render bench/results/*.json

Each table shows the latest measurement of each thing: results are read by date, then by file name, and a later
measurement of the same run replaces an earlier one. Results that no table shows any more go to bench/results/history/.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medcot.attention import DECODE_KERNELS, GQA_DECODE  # (no torch at import)
from medcot.modeling import checkpointing_name

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
RECIPE = ROOT / "configs" / "deepseek-r1-distill-llama-8b-medical.yaml"
NOTES_HEADING = "## Notes"  # where the hand-written part of BENCHMARKS.md starts

# Targets (set on an H100 80GB), judged under the table of what they measure.
TRAIN_TARGETS = {"unsloth_2x2048_tokens_per_s": 9500, "unsloth_vs_transformers_2x2048": 3.5, "unsloth_2x2048_peak_gib": 8.0,
                 "mfu_8x2048": 0.50}
GENERATION_TARGETS = {"eval_b32_tokens_per_s": 2000, "eval_b1_tokens_per_s": 65, "eval_vs_transformers_4bit": 3.0}
CHAIN_TARGETS = {"chain_wall_s": 300, "eval_tokens_per_s": 8000, "second_eval_compile_s": 5, "reference_wall_s": 90}
DEMO_TARGETS = {"setup_s": 180, "jobs_s": 300, "p_value": 0.05, "questions": 20}

Verdicts = list[tuple[str, str, "bool | None"]]


@dataclass(frozen=True, eq=False)  # one object per file: hashed by identity
class Part:
    """One results file: its name, cited under the tables it feeds, and what it holds."""

    name: str
    data: dict

    @property
    def meta(self) -> dict:
        return self.data.get("meta") or {}

    @property
    def date(self) -> str:
        return self.meta.get("date") or self.data.get("date") or Path(self.name).name[:10]  # names start with the date

    @property
    def kind(self) -> str | None:
        """Which script wrote it: "gpu" (bench/run.py), "demo" (bench/demo.py), "export" (bench/export.py), or None
        (another; no table)."""
        if "meta" in self.data:
            return "gpu"
        if "runs" in self.data and "weights_bytes" in self.data:
            return "export"
        return "demo" if "jobs" in self.data and "machine" in self.data else None


@dataclass(frozen=True)
class Row:
    """One measurement a table shows: its key in the results, what was measured, and the file it came from."""

    key: str
    entry: dict
    part: Part


def load_parts(paths: Iterable[Path | str]) -> list[Part]:
    """Results files in the order they were measured: by date, then by name. Each is named by its path from the
    repository's root (`bench/results/...`), as the tables cite it."""
    parts = []
    for path in map(Path, paths):
        name = str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)
        parts.append(Part(name, json.loads(path.read_text())))
    return sorted(parts, key=lambda p: (p.date, Path(p.name).name))


def page_sources(extra: Path | None = None) -> list[Path]:
    """The files BENCHMARKS.md is written from: bench/results/*.json, with `extra` (a run's new results) in place of a
    file of the same name."""
    paths = {p.name: p for p in RESULTS.glob("*.json")}
    if extra is not None:
        paths[extra.name] = extra
    return sorted(paths.values())


def write_benchmarks_md(path: Path, parts: list[Part]) -> list[str]:
    """The page from `parts`, above the hand-written notes that the file already has. Returns the names of the GPU
    and demo results that no table shows (superseded: they belong in bench/results/history/)."""
    text = path.read_text() if path.is_file() else ""
    kept = "\n" + text[text.index(NOTES_HEADING):] if NOTES_HEADING in text else ""
    page, cited = _render(parts)
    path.write_text(page + kept)
    return [p.name for p in parts if p.kind and p.name not in cited]


def render(parts: list[Part]) -> str:
    return _render(parts)[0]


def _render(parts: list[Part]) -> tuple[str, set[str]]:
    gpu = [p for p in parts if p.kind == "gpu"]
    page = _Page(_common_lock(gpu))
    sections = [_chain_section(gpu, page), _reference_section(gpu, page), _decoding_section(gpu, page),
                _generation_section(gpu, page), _training_section(gpu, page),
                _demo_section([p for p in parts if p.kind == "demo"], page),
                _export_section([p for p in parts if p.kind == "export"], page)]
    lines = ["# Benchmarks", "",
             "The current figures of medcot, one section per topic, each with the date, machine and versions it was "
             "measured on and the command that measures it again; the targets follow the figures they judge. The notes "
             "and the history of the changes that moved a number end the page.", ""]
    if any(p.meta.get("tiny") for p in gpu):
        lines += ["**--tiny run: a 2-layer model; these numbers check the benchmark, not the GPU.**", ""]
    if page.glance:
        lines += ["| topic | current figure | measured |", "| --- | --- | --- |"]
        lines += [f"| [{heading}](#{_anchor(heading)}) | {figure} | {dates} |" for heading, figure, dates in page.glance]
        lines.append("")
    lines.append("The GPU figures come from `bench/run.py`: medcot's own jobs and code on a Llama-3.1-8B-shaped model "
                 "with random bf16 weights (the architecture of DeepSeek-R1-Distill-Llama-8B); "
                 "[bench/README.md](bench/README.md) says what each number is and how it is counted. The commands run "
                 "on a GPU machine set up with `make setup-gpu`; on a machine that you reach only by copying files to "
                 "it, put `bash bench/device.sh` in place of `python3 bench/run.py`. This page is written from "
                 "`bench/results/*.json` by `python3 bench/run.py --render bench/results/*.json`.")
    build = next((p for p in reversed(gpu) if p.data.get("build", {}).get("build_s")), None)
    if build:
        b = build.data["build"]
        lines += ["", f"The model: {_fmt(b['params'] / 1e9, '.2f')} B parameters, built on the GPU in {b['build_s']} s and "
                      f"saved ({_fmt(b['bytes'] / 1e9, '.1f')} GB of safetensors) in {b['save_s']} s on {build.date} "
                      f"(`{build.name}`)."]
    if page.lock:
        lines += ["", f"Every GPU table ran on the packages of the image's lock (docker/requirements.lock) but these: "
                      f"{page.lock}."]
    for section in sections:
        lines += section
    return "\n".join(lines) + "\n", page.cited


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


class _Page:
    """What the sections share: the lock differences common to every GPU file, and the files the tables cite."""

    def __init__(self, lock: str | None) -> None:
        self.lock = lock
        self.cited: set[str] = set()
        self.glance: list[tuple[str, str, str]] = []  # (section heading, its headline figure, dates): the page's top

    def headline(self, heading: str, figure: str, rows: Iterable[Row | Part]) -> None:
        dates = sorted({(r.part if isinstance(r, Row) else r).date for r in rows})
        self.glance.append((heading, figure, _and(dates)))

    def measured(self, parts: Iterable[Part], extra: str = "") -> list[str]:
        """Under a heading: when, on which machine and with which versions; from which files."""
        groups: dict[tuple[str, str, str], list[Part]] = {}
        for part in dict.fromkeys(parts):  # in order, once each
            self.cited.add(part.name)
            lock = _lock_text(part.meta)
            key = (_machine(part.meta), _versions(part.meta), "" if lock == self.lock else lock or "")
            groups.setdefault(key, []).append(part)
        lines = []
        for (machine, versions, lock), group in groups.items():
            dates = _and(sorted({p.date for p in group}))
            differs = f"; installed versus the image's lock: {lock}" if lock else ""
            files = ", ".join(f"`{p.name}`" for p in group)
            lines.append(f"- Measured {dates} on {machine}: {versions}{differs}. Results: {files}.")
        if extra:
            lines.append(f"- {extra}")
        return lines


def _common_lock(parts: list[Part]) -> str | None:
    texts = {_lock_text(p.meta) for p in parts}
    return texts.pop() if len(texts) == 1 else None


def _lock_text(meta: dict) -> str | None:
    if "lock_differences" not in meta:  # results from before the lock have no such record
        return None
    return ", ".join(f"{name} {d['installed'] or 'missing'} (lock {d['lock']})"
                     for name, d in sorted(meta["lock_differences"].items())) or "none"


def _machine(meta: dict) -> str:
    return f"{meta.get('gpu')} ({meta.get('gpu_memory', '?')}, driver {meta.get('driver', '?')})"


def _versions(meta: dict) -> str:
    v = meta.get("versions", {})
    return (f"torch {v.get('torch')}, transformers {v.get('transformers')}, trl {v.get('trl')}, peft {v.get('peft')}, "
            f"bitsandbytes {v.get('bitsandbytes')}, unsloth {v.get('unsloth')} (zoo {v.get('unsloth_zoo')}), "
            f"triton {v.get('triton')}, Python {meta.get('python')}")


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _fmt(value: Any, spec: str = ",.0f", unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:{spec}}{unit}"


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("**pass**" if ok else "**miss**")


def _targets_table(title: str, verdicts: Verdicts, head: str = "target", intro: str = "") -> list[str]:
    lines = ["", f"### {title}", "", *([intro, ""] if intro else []), f"| {head} | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {name} | {measured} | {_verdict(ok)} |" for name, measured, ok in verdicts]
    if any(ok is None for _, _, ok in verdicts):
        lines += ["", "—: no current measurement (the history below has the last one)."]
    return lines


def _latest(parts: list[Part], section: str, keep: Callable[[str, dict], bool] = lambda key, entry: True,
            identity: Callable[[str, dict], Any] = lambda key, entry: key) -> list[Row]:
    """The latest measurement of each thing in `section`: a later one of the same identity replaces an earlier one."""
    rows: dict[Any, Row] = {}
    for part in parts:
        for key, entry in (part.data.get(section) or {}).items():
            if keep(key, entry):
                rows[identity(key, entry)] = Row(key, entry, part)
    return list(rows.values())


def _dated(rows: list[Row]) -> bool:
    """Whether a table's rows were measured on more than one day (then each row names its date)."""
    return len({r.part.date for r in rows}) > 1


# -- The chain ------------------------------------------------------------------------------------------------------

def _chains(parts: list[Part]) -> tuple[Row | None, list[Row]]:
    """The latest chain with the recipe's settings, and the latest chain of each set of overrides (shown, not judged)."""
    recipe: Row | None = None
    variants: dict[str, Row] = {}
    for part in parts:
        # A file that merged two runs of a day (bench.common.merge_results) keeps the chains with overrides apart.
        for chain in [*(part.data.get("chain_variants") or {}).values(), part.data.get("chain") or {}]:
            if not chain.get("stages"):
                continue
            if chain.get("overrides"):
                variants[", ".join(chain["overrides"])] = Row(", ".join(chain["overrides"]), chain, part)
            else:
                recipe = Row("chain", chain, part)
    return recipe, list(variants.values())


def _chain_section(parts: list[Part], page: _Page) -> list[str]:
    recipe, variants = _chains(parts)
    if not recipe and not variants:
        return []
    lines = ["", "## The chain", "",
             "The five jobs as `docker compose up` runs them, each its own process, on a machine where nothing was "
             "compiled yet: the recipe's config on synthetic rows (500 trained, 100 held out), 1,200 new tokens per "
             "answer, `eval.batch_size: auto`. Start-up = wall time before the stage's own work began (Python, imports, "
             "CUDA, config). Compile = the train job's first step beyond a steady one, or an evaluate job's prefill and "
             "first decoding steps beyond steady ones. Compile cache = files in the shared cache when the job started."]
    if recipe:
        page.headline("The chain", f"{_fmt(recipe.entry.get('wall_s'), '.1f', ' s')} for the five jobs on a new machine",
                      [recipe])
        lines += [""] + page.measured([recipe.part], "Rerun: `python3 bench/run.py --sections build,chain "
                                                     "--chain-without-cache` (the last adds evaluate-after on an empty "
                                                     "compile cache).")
        lines += _chain_table(recipe.entry)
        lines += _targets_table("Targets: the chain", _chain_targets(recipe.entry))
    for row in variants:
        lines += ["", f"### The chain with `{row.key}` (not judged)", ""]
        lines += page.measured([row.part], f"Rerun: `python3 bench/run.py --sections build,chain --chain-overrides "
                                           f"{row.key} --chain-without-cache`.")
        lines += _chain_table(row.entry)
    return lines


def _chain_table(chain: dict) -> list[str]:
    lines = ["", "| stage | wall | start-up | compile | compile cache | what it did |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]

    def did(stage: str, e: dict) -> str:
        if e.get("exit") not in (0, None):
            return f"exit {e['exit']}"
        if stage.startswith("eval"):
            steady = (f"; a steady step {e['step_s'] * 1000:.1f} ms = {e['batch_size'] / e['step_s']:,.0f} tokens/s"
                      if e.get("step_s") else "")
            layer = ", decoder layer not compiled" if e.get("decode_compiled") is False else ""
            return (f"{e.get('questions')} answers, batch {e.get('batch_size')}, {e.get('weights')} weights{layer}: "
                    f"{_fmt(e.get('generated_tokens'))} tokens in {_fmt(e.get('generation_s'), '.1f', ' s')} = "
                    f"{_fmt(e.get('tokens_per_s'))} tokens/s{steady}; load {_fmt(e.get('load_s'), '.1f', ' s')}")
        if stage == "train":
            return (f"{e.get('steps')} steps in {_fmt(e.get('train_s'), '.1f', ' s')} ({_fmt(e.get('tokens_per_s'))} "
                    f"tokens/s, first step {_fmt(e.get('first_step_s'), '.1f', ' s')}, then "
                    f"{_fmt(e.get('median_step_s'), '.2f', ' s')} a step); load {_fmt(e.get('load_s'), '.1f', ' s')}")
        return f"{_fmt((e.get('bytes') or 0) / 1e9, '.1f', ' GB')}" + (" hashed into the upload plan" if stage == "push-dry-run" else " written")

    def row(stage: str, e: dict) -> str:
        return (f"| {stage} | {_fmt(e.get('wall_s'), '.1f', ' s')} | {_fmt(e.get('startup_s'), '.1f', ' s')} | "
                f"{_fmt(e.get('compile_s'), '.1f', ' s')} | {_fmt(e.get('compile_cache_files_before'))} | {did(stage, e)} |")

    lines += [row(stage, e) for stage, e in chain["stages"].items()]
    lines.append(f"| **whole chain** | **{_fmt(chain.get('wall_s'), '.1f', ' s')}** | | | | first start to last exit |")
    if chain.get("eval_after_without_cache"):
        lines.append(row("eval-after again, empty compile cache", chain["eval_after_without_cache"]))
    why = next((e.get("batch_size_why") for e in chain["stages"].values() if e.get("batch_size_why")), None)
    if why:
        lines += ["", f"eval.batch_size auto: {why}."]
    return lines


def _chain_targets(chain: dict) -> Verdicts:
    t, stages = CHAIN_TARGETS, chain["stages"]
    wall = chain.get("wall_s")
    second = stages.get("eval-after", {}).get("compile_s")
    cold = (chain.get("eval_after_without_cache") or {}).get("compile_s")
    return [(f"whole chain <= {t['chain_wall_s']} s, downloads excluded", _fmt(wall, '.1f', ' s'),
             None if wall is None else wall <= t["chain_wall_s"]),
            (f"a second evaluate job compiles in <= {t['second_eval_compile_s']} s",
             f"{_fmt(second, '.1f', ' s')} (without the cache: {_fmt(cold, '.1f', ' s')})",
             None if second is None else second <= t["second_eval_compile_s"])]


# -- The reference train job ----------------------------------------------------------------------------------------

def _recipe_layout() -> tuple[int, int]:
    training = yaml.safe_load(RECIPE.read_text())["training"]
    return training["per_device_train_batch_size"], training["gradient_accumulation_steps"]


def _switched_off(e: dict) -> str:
    """What a reference run changed from the recipe as shipped ("" for none), as its row says it."""
    flags = e.get("training") or {}
    changes = []
    if flags.get("padding_free") is False or (not flags and e.get("padding_free") is False):
        changes.append("padded batches (`training.padding_free: false`)")
    if flags.get("sampling"):
        changes.append(f"`training.sampling: {flags['sampling']}`")
    if e.get("gc") != "auto":
        changes.append(f"checkpointing {checkpointing_name(e.get('gc'))}")
    if e.get("gc_freeze") is False:
        changes.append("imports' heap not frozen (`MEDCOT_GC_FREEZE=0`)")
    if e.get("unsloth_sft_only") is False:
        changes.append("every TRL trainer rewritten (`MEDCOT_UNSLOTH_SFT_ONLY=0`)")
    return ", ".join(changes)


def reference_rows(parts: list[Part]) -> list[Row]:
    """The train job with the recipe's layout, as shipped and with one of its speed-ups switched off, per compile-cache
    state; runs under the profiler (diagnosis, not timing) are left out. The recipe as shipped comes first."""
    layout = _recipe_layout()
    rows = _latest(parts, "reference",
                   keep=lambda key, e: (e.get("micro_batch"), e.get("accumulation")) == layout and "profile" not in e,
                   identity=lambda key, e: (_switched_off(e), e.get("compile_cache")))
    return sorted(rows, key=lambda r: (_switched_off(r.entry) != "", _switched_off(r.entry),
                                       r.entry.get("compile_cache") != "shared"))


def _reference_section(parts: list[Part], page: _Page) -> list[str]:
    rows = reference_rows(parts)
    if not rows:
        return []
    micro, accum = _recipe_layout()
    dated = _dated(rows)
    # Runs on an empty cache of their own first, then those that found the shared cache empty, then the rest.
    variants = [r.entry["variant"] for r in sorted(rows, key=lambda r: (":cold" not in r.entry.get("variant", ""),
                                                                        r.entry.get("compile_cache") == "shared"))]
    lines = ["", "## The reference train job", "",
             f"`jobs/train.py` with the recipe (`{RECIPE.relative_to(ROOT)}`: {micro * accum} rows a step as {accum} "
             f"micro-batch{'es' if accum > 1 else ''} of {micro}, 60 steps, "
             "`lora.use_gradient_checkpointing: auto`) on 500 synthetic rows of realistic lengths, timed from start to "
             "exit: import and model load included. Compile cache: the one an earlier job filled, or empty, as for the "
             "first job of a new machine. Start-up = the wall time before the job's own work began (interpreter, "
             "`import unsloth`, CUDA, config). Torch compile = Dynamo's and Inductor's own count during training, and the "
             "frames compiled; the first step's remaining extra time is Triton's kernels (cached in the compile cache) "
             "and first-use set-up. Each row but the first switches one of the job's speed-ups off.", ""]
    lines += page.measured([r.part for r in rows], "Rerun, on a new machine (its first train job finds an empty cache): "
                           f"`python3 bench/run.py --sections build,reference --reference {','.join(dict.fromkeys(variants))}`.")
    lines += ["", "| run | compile cache | checkpointing | wall | start-up | model load | first step (steady step) | train "
              "| tokens/s | peak GPU memory | final loss | torch compile |" + (" date |" if dated else ""),
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" --- |" if dated else "")]
    for r in rows:
        e = r.entry
        gc = checkpointing_name(e["gc"])
        if e["gc"] == "auto" and "checkpointing" in e:
            gc = f"auto: {checkpointing_name(e['checkpointing'])}"
        lines.append(f"| {_switched_off(e) or 'as shipped'} | {_cache_text(e)} | {gc} | {_fmt(e.get('wall_s'), '.1f', ' s')} | "
                     f"{_fmt(e.get('startup_s'), '.1f', ' s')} | {_fmt(e.get('model_load_s'), '.1f', ' s')} | "
                     f"{_fmt(e.get('first_step_s'), '.1f', ' s')} ({_fmt(e.get('median_step_s'), '.2f', ' s')}) | "
                     f"{_fmt(e.get('train_s'), '.1f', ' s')} | {_fmt(e.get('tokens_per_s'))} | "
                     f"{_fmt(e.get('peak_memory_gib'), '.1f', ' GiB')} | {_fmt((e.get('losses') or [None])[-1], '.4f')} | "
                     f"{_compile_text(e)} |" + (f" {r.part.date} |" if dated else ""))
    shipped = [r for r in rows if not _switched_off(r.entry)]
    if shipped:
        page.headline("The reference train job", ", ".join(
            f"{_fmt(r.entry.get('wall_s'), '.1f', ' s')} with "
            f"{'the compile cache of an earlier job' if r.entry.get('compile_cache') == 'shared' else 'an empty compile cache'}"
            for r in shipped), shipped)
    agreement = loss_agreement(rows)
    if agreement:
        lines += ["", agreement]
    lines += _targets_table("Targets: the train job", _reference_targets(rows))
    return lines


def _row_name(r: Row) -> str:
    return f"{_switched_off(r.entry) or 'as shipped'}, {_cache_text(r.entry)}"


def _cache_text(entry: dict) -> str:
    files = entry.get("compile_cache_files_before")
    if entry.get("compile_cache") == "shared":
        return f"an earlier job's ({files} files)" if files else "an earlier job's"
    return entry.get("compile_cache", "—")


def _compile_text(entry: dict) -> str:
    seconds, frames = entry.get("torch_compile_s"), entry.get("torch_compiled_frames")
    if seconds is None:
        return "—"
    return f"{seconds:.1f} s ({frames} frame{'' if frames == 1 else 's'})"


def loss_agreement(rows: list[Row]) -> str | None:
    """How far the loss curves of runs that train the same rows in the same order lie from the first one's."""
    runs = [r for r in rows if r.entry.get("losses") and not (r.entry.get("training") or {}).get("sampling")]
    if len(runs) < 2:
        return None
    base, parts = runs[0], []
    for r in runs[1:]:
        n = min(len(base.entry["losses"]), len(r.entry["losses"]))
        worst = max(abs(a - b) for a, b in zip(base.entry["losses"][:n], r.entry["losses"][:n], strict=True))
        parts.append(f"{worst:.4f} ({_row_name(r)})")
    return (f"Loss curves (the same rows in the same order, the same global batch): the largest per-step difference "
            f"from the first row's over {len(base.entry['losses'])} steps: " + "; ".join(parts) + ".")


def _reference_targets(rows: list[Row]) -> Verdicts:
    """The recipe as shipped, judged per compile-cache state: with the cache an earlier job filled, and with an empty
    one (the first train job of a new machine)."""
    t, out = CHAIN_TARGETS, []
    for cache, label in (("shared", "the compile cache of an earlier job"), ("empty", "an empty compile cache")):
        walls = [r.entry["wall_s"] for r in rows if not _switched_off(r.entry) and r.entry.get("exit_code") == 0
                 and r.entry.get("compile_cache") == cache]
        out.append((f"the train job, the recipe as shipped, <= {t['reference_wall_s']} s, {label}",
                    ", ".join(f"{w:.1f} s" for w in walls) or "—",
                    None if not walls else min(walls) <= t["reference_wall_s"]))
    return out


# -- Decoding and generation ----------------------------------------------------------------------------------------

def _compile_time(entry: dict, name: str) -> float | None:
    """One line of torch's compile_times() table ("name, seconds") in a decode worker's result."""
    for line in (entry.get("compile_times") or "").splitlines():
        key, _, value = line.partition(",")
        if key.strip() == name:
            return float(value)
    return None


def _decoding_section(parts: list[Part], page: _Page) -> list[str]:
    """The decode section: each worker's compile (torch's own breakdown), the steady decoding step at batch 101 with
    1,200-token answers, and the same generate call again in that process."""
    rows = _latest(parts, "decode")
    recipe, _ = _chains(parts)
    if not rows:
        return []
    dated = _dated(rows)
    lines = ["", "## Decoding at batch 101", "",
             "The evaluate job's `generate` on the merged 16-bit weights, 101 rows of 1,200 new tokens, each row of the "
             "table a new process. Compile = the first call's time beyond steady steps (prefill, compilation, CUDA-graph "
             "capture); torch's own count of it: Dynamo and Inductor together, and Dynamo's tracing of the Python code "
             "alone. Steady = the median decoding step of the full run. Warm call = the same generate call again in that "
             "process, after a warm-up of the same shapes: generated tokens / its time.", ""]
    lines += page.measured([r.part for r in rows], "Rerun: `python3 bench/run.py --sections build,decode "
                           "--decode-kernels graph:triton,graph:efficient,graph:triton:eager` (each run on an empty cache "
                           "of its own; the first is then run again from its cache: put `graph:triton:eager` first for "
                           "that row of the uncompiled layer).")
    lines += ["", "| run | decoding-step attention | compile | torch: compile / tracing | steady step | steady tokens/s "
              "| warm call tokens/s |" + (" date |" if dated else ""),
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |" + (" --- |" if dated else "")]
    for r in rows:
        e = r.entry
        full = e.get("full") or e.get("first") or {}
        # Runs before the kernel was recorded name it in their label ("..., matmul"); earlier ones ran sdpa.
        named = r.key.rpartition(", ")[2]
        kernel = full.get("decode_attention") or e.get("kernel") or (named if named in DECODE_KERNELS else "sdpa")
        if full.get("decoder"):  # medcot's graph decoder or transformers' generate
            kernel = f"{full['decoder']}: {kernel}"
        compile_s = full.get("warmup_s") if full else None
        if compile_s is None and e.get("first_40_steps_s") is not None:
            compile_s = e["first_40_steps_s"]
        step = (e.get("full") or {}).get("step_s")
        torch_s = (f"{_fmt(_compile_time(e, '_compile.compile_inner'), '.1f', ' s')} / "
                   f"{_fmt(_compile_time(e, 'bytecode_tracing'), '.1f', ' s')}")
        lines.append(f"| {r.key} | {kernel} | {_fmt(compile_s, '.1f', ' s')}"
                     f"{' (40 steps)' if 'first_40_steps_s' in e else ''} | {torch_s} | "
                     f"{_fmt(step * 1000 if step else None, '.1f', ' ms')} | {_fmt(101 / step if step else None)} | "
                     f"{_fmt((e.get('warm') or {}).get('tokens_per_s'))} |" + (f" {r.part.date} |" if dated else ""))
    warm = [r for r in rows if (r.entry.get("warm") or {}).get("tokens_per_s")]
    if warm:
        best = max(warm, key=lambda r: r.entry["warm"]["tokens_per_s"])
        page.headline("Decoding at batch 101", f"{_fmt(best.entry['warm']['tokens_per_s'])} generated tokens/s, the "
                      "evaluate job's generate call after a warm-up", [best])
    targets, whole_call = _evaluation_targets(rows, recipe.entry if recipe else None)
    lines += _targets_table("Targets: the evaluate job's generation", targets)
    if whole_call:
        lines += _targets_table("Stricter: the whole generate call, its compile included", whole_call,
                                head="stricter than the target",
                                intro="The targets count the generate call after a warm-up of the same shapes, and "
                                      "budget the second evaluate job's compile on a line of their own. Here the "
                                      "chain's evaluate jobs are held to the same rate for the whole call, compile and "
                                      "the rows that end early included, per compile-cache state.")
    return lines


def _evaluation_targets(rows: list[Row], chain: dict | None) -> tuple[Verdicts, Verdicts]:
    """>= 8,000 generated tokens/s: the warm generate call of medcot's graph decoder, and the chain's evaluate jobs'
    steady step; then, apart, their whole generate call per compile-cache state."""
    t = CHAIN_TARGETS["eval_tokens_per_s"]
    out: Verdicts = []
    whole_call: Verdicts = []
    warm = {r.key: r.entry["warm"]["tokens_per_s"] for r in rows
            if r.entry.get("warm") and (r.entry.get("full") or {}).get("decoder") == "graph"
            and r.entry["full"].get("decode_attention") == "triton" and r.entry["full"].get("compiled") is not False}
    if warm:
        out.append((f"evaluation >= {t:,} generated tokens/s at the auto batch: the generate call after a warm-up of "
                    "the same shapes (batch 101)", ", ".join(f"{rate:,.0f} ({label})" for label, rate in warm.items()),
                    min(warm.values()) >= t))
    if not chain:
        return out, whole_call
    evals = {s: e for s, e in chain["stages"].items() if s.startswith("eval")}
    steady = {s: e["batch_size"] / e["step_s"] for s, e in evals.items() if e.get("step_s") and e.get("batch_size")}
    if steady:
        out.append((f"evaluation >= {t:,} generated tokens/s at the auto batch: steady decoding (the chain)",
                    ", ".join(f"{rate:,.0f} ({s}, batch {evals[s]['batch_size']})" for s, rate in steady.items()),
                    min(steady.values()) >= t))
    runs = {**evals, "eval-after, empty cache": chain.get("eval_after_without_cache") or {}}
    for cache, label in (("shared", "the compile cache of an earlier job"), ("empty", "an empty compile cache")):
        picked = {s: e for s, e in runs.items() if e.get("tokens_per_s")
                  and (e.get("compile_cache_files_before", 0) > 0) == (cache == "shared")}
        whole_call.append((f"evaluation >= {t:,} generated tokens/s at the auto batch: the whole generate call "
                           f"(compile, early ends), {label}",
                           ", ".join(f"{e['tokens_per_s']:,.0f} ({s}, batch {e.get('batch_size')})" for s, e in picked.items())
                           or "—", None if not picked else min(e["tokens_per_s"] for e in picked.values()) >= t))
    return out, whole_call


def _generation_section(parts: list[Part], page: _Page) -> list[str]:
    rows = _latest(parts, "eval")
    if not rows:
        return []
    adapters = {r.entry.get("adapter") for r in rows}
    lines = ["", "## Generation at batch 1, 8 and 32", "",
             "The evaluate job's `generate` (`medcot.generation.generate` on `medcot.modeling.load_with_adapter`), greedy, "
             "every row generating the full length; prompts of 133 to 211 tokens, left-padded; tokens/s = generated "
             "tokens / time of the `generate` call, after a 16-token warm-up with the same shapes. "
             + ("With the reference run's trained adapter (unmerged LoRA on the 4-bit paths, merged into the bf16 "
                "weights for transformers-16bit-static)." if adapters - {None} else "Base model, no adapter."), ""]
    lines += page.measured([r.part for r in rows], "Rerun (the reference run first, for a trained adapter): "
                           "`python3 bench/run.py --sections build,reference,eval --reference 8x1:auto --eval "
                           f"{','.join(r.key for r in rows)}`.")
    lines += ["", "| variant | batch | new tokens per row | generated tokens/s | peak GPU memory | model load |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        variant = r.key.partition(":")[0]
        if r.entry.get("attention") == GQA_DECODE:
            variant += " (grouped-query decoding)"
        for e in r.entry.get("batches", []):
            lines.append(f"| {variant} | {e['batch']} | {e['new_tokens']} | "
                         f"{_fmt(e.get('tokens_per_s'), ',.1f') if 'error' not in e else e['error']} | "
                         f"{_fmt(e.get('peak_memory_gib'), '.1f', ' GiB')} | {r.entry.get('load_s', '—')} s |")
        if r.entry.get("exit") not in (None, 0):
            lines.append(f"| {variant} | (worker exit: {r.entry['exit']}) | | | | |")
    page.headline("Generation at batch 1, 8 and 32", ", ".join(
        f"{_fmt(e.get('tokens_per_s'), ',.0f')} tokens/s at batch {e['batch']}" for e in rows[0].entry.get("batches", []))
        + f" ({rows[0].key.partition(':')[0]})", rows[:1])
    lines += _targets_table("Targets: generation", generation_targets(rows))
    return lines


def generation_targets(rows: list[Row]) -> Verdicts:
    t, runs = GENERATION_TARGETS, {r.key: r.entry for r in rows}

    def rate(key: str, batch: int) -> float | None:
        return next((e.get("tokens_per_s") for e in runs[key].get("batches", []) if e["batch"] == batch), None)

    def tokens(key: str) -> int | None:
        return next((e.get("new_tokens") for e in runs[key].get("batches", [])), None)

    # Keys are VARIANT:NEW_TOKENS. The verdict counts answers of the evaluate job's length (1,200 new tokens)
    # where such a run exists; shorter runs are listed beside it.
    out: Verdicts = []
    fast = [k for k in runs if not k.startswith("transformers-4bit")]
    judged = [k for k in fast if tokens(k) == 1200] or fast
    for batch, key in ((32, "eval_b32_tokens_per_s"), (1, "eval_b1_tokens_per_s")):
        rates = {k: rate(k, batch) for k in fast if rate(k, batch)}
        scored = {k: r for k, r in rates.items() if k in judged}
        out.append((f"eval, batch {batch} >= {t[key]:,} tokens/s",
                    ", ".join(f"{r:,.0f} ({k.partition(':')[0]}, {tokens(k)} new tokens)" for k, r in rates.items()) or "—",
                    None if not scored else max(scored.values()) >= t[key]))
    ratios = []
    for batch in (1, 8, 32):
        baseline = next((rate(k, batch) for k in runs if k.startswith("transformers-4bit") and rate(k, batch)), None)
        rates = [rate(k, batch) for k in judged if rate(k, batch)]
        if baseline and rates:
            ratios.append((batch, max(rates) / baseline))
    out.append((f"eval, best >= {t['eval_vs_transformers_4bit']:.0f}x transformers 4-bit at each batch",
                ", ".join(f"{r:.1f}x (batch {b})" for b, r in ratios) or "—",
                None if not ratios else min(r for _, r in ratios) >= t["eval_vs_transformers_4bit"]))
    return out


# -- Training throughput --------------------------------------------------------------------------------------------

def _training_section(parts: list[Part], page: _Page) -> list[str]:
    rows = _latest(parts, "train")
    if not rows:
        return []
    peak_part = next((p for p in reversed(parts) if (p.data.get("peak") or {}).get("matmul_bf16_tflops")
                      and p.meta.get("gpu") == rows[-1].part.meta.get("gpu")), None)
    peak = peak_part.data["peak"]["matmul_bf16_tflops"] if peak_part else None
    shapes = {r.key: "+".join(f"{s['batch']}x{s['seq_len']}" for s in r.entry.get("shapes", [])) for r in rows}
    runs = ",".join(f"{key}@{shape}" for key, shape in shapes.items())
    lines = ["", "## Training throughput", "",
             "4-bit NF4 base, LoRA r 16 on all 7 projections, 8-bit AdamW, bf16: `run_training` on rows of exactly batch x "
             "length tokens; tokens/s over the timed steps that follow the warm-up steps (no compilation, start-up or "
             "checkpoint inside). MFU: model FLOPs (bench/README.md) over the GPU's bf16 matmul peak.", ""]
    lines += page.measured([r.part for r in rows] + ([peak_part] if peak_part else []),
                           f"bf16 matmul peak (8192^3, median): {_fmt(peak, ',.0f', ' TFLOP/s')}. Rerun: "
                           f"`python3 bench/run.py --sections peak,build,train --train-runs {runs}`.")
    lines += ["", "| path | checkpointing | batch x length | timed steps | tokens/s | peak GPU memory | MFU | model load |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]

    def mfu(entry: dict) -> float | None:
        if not entry.get("tokens_per_s") or not peak:
            return None
        return entry["tokens_per_s"] * entry["flops_per_token"] / (peak * 1e12)

    for r in rows:
        backend, gc, *layout = r.key.split(":")
        gc = {"unsloth": "unsloth (offloaded)" if backend == "unsloth" else "plain", "true": "plain", "false": "none"}[gc]
        # The first results had no layout in the key: Unsloth chose (padding-free), or padded by an environment variable.
        layout = (layout or ["padded" if r.entry.get("env") else "auto"])[0]
        if backend == "unsloth":
            backend += {"padded": ", padded batches", "padding_free": ", padding-free", "default": ", medcot default",
                        "auto": ", Unsloth's choice (padding-free)"}[layout]
        for e in r.entry.get("shapes", []):
            lines.append(f"| {backend} | {gc} | {e['batch']}x{e['seq_len']} | {e.get('steps', '—')} | "
                         f"{_fmt(e.get('tokens_per_s')) if 'error' not in e else e['error']} | "
                         f"{_fmt(e.get('peak_memory_gib'), '.1f', ' GiB')} | {_fmt(mfu(e), '.1%')} | {r.entry.get('load_s', '—')} s |")
        if r.entry.get("exit") not in (None, 0):
            lines.append(f"| {backend} | {gc} | (worker exit: {r.entry['exit']}) | | | | | |")
    page.headline("Training throughput", "; ".join(
        f"{_fmt(e.get('tokens_per_s'))} tokens/s at {e['batch']}x{e['seq_len']} "
        + {"unsloth": "with Unsloth's offloaded checkpointing", "true": "with plain checkpointing",
           "false": "without checkpointing"}[r.key.split(":")[1]]
        for r in rows for e in r.entry.get("shapes", [])[:1]), rows)
    lines += _targets_table("Targets: training throughput", training_targets(rows, mfu))
    return lines


def training_targets(rows: list[Row], mfu: Callable[[dict], float | None]) -> Verdicts:
    t, runs = TRAIN_TARGETS, {r.key: r.entry for r in rows}

    def shape(key: str, batch: int, seq: int) -> dict:
        return next((e for e in runs[key].get("shapes", []) if e["batch"] == batch and e["seq_len"] == seq), {})

    # The fastest Unsloth run at 2x2048 that keeps the memory target (the recipe must fit a 12 GB card).
    unsloth_runs = {k: shape(k, 2, 2048) for k in runs if k.startswith("unsloth")}
    fitting = {k: e for k, e in unsloth_runs.items() if e.get("tokens_per_s") and e.get("peak_memory_gib", 99) <= t["unsloth_2x2048_peak_gib"]}
    pool = fitting or {k: e for k, e in unsloth_runs.items() if e.get("tokens_per_s")}
    best_key = max(pool, key=lambda k: pool[k]["tokens_per_s"]) if pool else None
    uns = pool.get(best_key, {}) if best_key else {}
    base = next((shape(k, 2, 2048) for k in runs if k.startswith("transformers")), {})
    label = f" ({best_key})" if best_key else ""
    out: Verdicts = []
    tps = uns.get("tokens_per_s")
    out.append((f"train, Unsloth 2x2048 >= {t['unsloth_2x2048_tokens_per_s']:,} tokens/s", _fmt(tps) + label,
                None if tps is None else tps >= t["unsloth_2x2048_tokens_per_s"]))
    ratio = tps / base["tokens_per_s"] if tps and base.get("tokens_per_s") else None
    out.append((f"train, Unsloth >= {t['unsloth_vs_transformers_2x2048']}x transformers at 2x2048", _fmt(ratio, '.2f', 'x'),
                None if ratio is None else ratio >= t["unsloth_vs_transformers_2x2048"]))
    mem = uns.get("peak_memory_gib")
    out.append((f"train, Unsloth 2x2048 peak <= {t['unsloth_2x2048_peak_gib']:.0f} GiB", _fmt(mem, '.1f', ' GiB') + label,
                None if mem is None else mem <= t["unsloth_2x2048_peak_gib"]))
    mfus = {k: mfu(shape(k, 8, 2048)) for k in runs if k.startswith("unsloth")}
    mfus = {k: m for k, m in mfus.items() if m is not None}
    out.append((f"train, 8x2048 >= {t['mfu_8x2048']:.0%} MFU", ", ".join(f"{m:.1%} ({k})" for k, m in mfus.items()) or "—",
                max(mfus.values()) >= t["mfu_8x2048"] if mfus else None))
    return out


# -- The CPU demo ---------------------------------------------------------------------------------------------------

def _demo_section(parts: list[Part], page: _Page) -> list[str]:
    """The latest demo of each kind of CPU (its name and the dtype medcot chose on it): AMX and AVX2 differ by 1.5x."""
    latest = {(p.data["machine"], p.data["dtype"]): p for p in parts}
    if not latest:
        return []
    chosen = list(latest.values())
    page.cited.update(p.name for p in chosen)
    page.headline("The CPU demo", "; ".join(
        f"`make demo` {p.data['jobs_s']} s" + (f", `make setup` {p.data['setup_s']} s" if p.data.get("setup_s") else "")
        + f" ({_cpu_kind(p.data)})" for p in chosen), chosen)
    lines = ["", "## The CPU demo", "",
             "`make demo` on a 2-core CPU, timed job by job, and the numbers its report shows; the latest run on each "
             "kind of CPU. On a CPU with AMX or AVX-512 BF16 the jobs run in bf16, elsewhere in fp32 (docs/performance.md: "
             "why).", "",
             "- Rerun: `python3 bench/demo.py --clean-clone` (a clone of HEAD, `make setup` without caches, then the "
             "demo's jobs)."]
    for part in chosen:
        lines += ["", *render_demo(part.data, part.name).rstrip("\n").split("\n")]
    return lines


def _cpu_kind(result: dict[str, Any]) -> str:
    return f"{result['machine']}, {result['dtype'].split(' (')[0]}"


def render_demo(result: dict[str, Any], name: str) -> str:
    """One run of the CPU demo (bench/demo.py's results): the time of each job and the report's key numbers."""
    source = f"a clean clone of {result['commit']}" if result.get("setup_s") else f"a checkout at {result['commit']}"
    lines = [f"### {_cpu_kind(result)}", "",
             f"- Measured {result['date']} on {result['machine']}: torch {result['torch']}, {result['dtype']}; {source}. "
             f"Results: `{name}`.", "", "| step | wall |", "| --- | ---: |"]
    if result.get("setup_s") is not None:
        lines.append(f"| make setup (venv, CPU torch, uv install, embedded model converted; no caches) | {result['setup_s']} s |")
    for job in result["jobs"]:
        failed = "" if job["exit"] == 0 else f" (exit {job['exit']})"
        lines.append(f"| {job['job']} | {job['wall_s']} s{failed} |")
    lines.append(f"| **the demo's jobs** | **{result['jobs_s']} s** |")
    lines += [line.replace("### Targets", "#### Targets") for line in
              _targets_table(f"Targets: the CPU demo on {_cpu_kind(result)}", demo_verdicts(result))]
    rouge = (result.get("report") or {}).get("rouge_l")
    if rouge:
        lines += ["", f"ROUGE-L against the reference answers: paired difference {rouge['mean_difference']:+.3f} "
                      f"[{rouge['ci'][0]:+.3f}, {rouge['ci'][1]:+.3f}] over {rouge['n']} held-out questions."]
    return "\n".join(lines) + "\n"


# -- Export to GGUF -------------------------------------------------------------------------------------------------

EXPORT_TARGETS = {"q8_0_8b_s": 180, "memory_margin_gb": 2}


def _export_section(parts: list[Part], page: _Page) -> list[str]:
    """The latest export benchmark of each model (bench/export.py): each type's time, file size and peak memory."""
    latest = {p.data["model"]: p for p in parts}
    if not latest:
        return []
    chosen = list(latest.values())
    page.cited.update(p.name for p in chosen)
    eight = latest.get("8b")
    if eight:
        q8 = [r for r in eight.data["runs"] if r["type"] == "q8_0"]
        if q8:
            best = min(q8, key=lambda r: r["process_s"])
            page.headline("Export to GGUF", f"8B to q8_0 in {best['process_s']:.0f} s on {best['workers']} CPU threads, "
                          f"{best['peak_rss'] / 1e9:.1f} GB peak memory", [eight])
    lines = ["", "## Export to GGUF", "",
             "The export job (`make export`) writing the merged model as GGUF: each type in a fresh process; writing = "
             "inside the job's writer, process = the whole job's process (imports, tokenizer, the file); peak memory = "
             "the process's peak resident set.", "",
             "- Rerun: `python3 bench/export.py --model 8b --out DIR` (DeepSeek-R1-Distill-Llama-8B's architecture with "
             "random weights, built once), or `--folder outputs/demo/merge/model` after `make demo`."]
    for part in chosen:
        d, m = part.data, part.data["machine"]
        lines += ["", f"### {d['model']}: {d['weights_bytes'] / 1e9:.2f} GB of 16-bit weights", "",
                  f"- Measured {part.date} on {m['cpu']}, {m['cpus']} CPUs, {m['memory_gib']} GiB: gguf {m['gguf']}, "
                  f"numpy {m['numpy']}, torch {m['torch']}, Python {m['python']}. Results: `{part.name}`.", "",
                  "| type | threads | writing | process | file | peak memory |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {r['type']} | {r['workers']} | {r['seconds']:.1f} s | {r['process_s']:.1f} s | "
                  f"{r['bytes'] / 1e9:.2f} GB | {r['peak_rss'] / 1e9:.2f} GB |" for r in d["runs"]]
        if d["model"] == "8b":
            lines += [line.replace("### Targets", "#### Targets") for line in
                      _targets_table("Targets: export", export_verdicts(d))]
    return lines


def export_verdicts(result: dict[str, Any]) -> Verdicts:
    t = EXPORT_TARGETS
    limit = result["weights_bytes"] / 1e9 + t["memory_margin_gb"]
    out: Verdicts = []
    for r in result["runs"]:
        if r["type"] == "q8_0":
            out.append((f"8B to q8_0 in <= {t['q8_0_8b_s']} s on the GPU machine's CPUs",
                        f"{r['process_s']:.1f} s ({r['workers']} threads)", r["process_s"] <= t["q8_0_8b_s"]))
    peak = max(r["peak_rss"] for r in result["runs"]) / 1e9
    out.append((f"peak memory <= the 16-bit weights + {t['memory_margin_gb']} GB ({limit:.1f} GB)", f"{peak:.2f} GB",
                peak <= limit))
    return out


def demo_verdicts(result: dict[str, Any]) -> Verdicts:
    t, r = DEMO_TARGETS, result.get("report") or {}
    out: Verdicts = []
    setup = result.get("setup_s")
    out.append((f"setup <= {t['setup_s']} s (clean clone, no caches)", f"{setup} s" if setup else "not timed (--clean-clone)",
                None if setup is None else setup <= t["setup_s"]))
    out.append((f"the demo's jobs <= {t['jobs_s']} s", f"{result['jobs_s']} s", result["jobs_s"] <= t["jobs_s"]))
    for name in ("format", "think closed"):
        s = r.get(name)
        if s:
            ok = s["after"] > s["before"] and s["p_value"] is not None and s["p_value"] < t["p_value"] and r["questions"] >= t["questions"]
            out.append((f"{name} rate rises, McNemar p < {t['p_value']} on >= {t['questions']} questions",
                        f"{s['before']:.2f} -> {s['after']:.2f}, {s['improved']} improved / {s['worsened']} worsened, "
                        f"p = {s['p_value']:.3g}, {r['questions']} questions", ok))
    loss = r.get("heldout_loss")
    if loss:
        b, a = loss["before_ci"], loss["after_ci"]
        out.append(("held-out loss intervals do not overlap",
                    f"{loss['before']:.3f} [{b[0]:.3f}, {b[1]:.3f}] -> {loss['after']:.3f} [{a[0]:.3f}, {a[1]:.3f}]",
                    a[1] < b[0]))
    for name, m in (r.get("mcq") or {}).items():
        out.append((f"most multiple-choice answers parse ({name})", f"{m['parsed']}/{m['n']} parse, {m['correct']} correct "
                    f"(before: {r['mcq_before'][name]['parsed']}/{m['n']} parse)", m["parsed"] > m["n"] / 2))
    return out
