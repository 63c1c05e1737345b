"""The lm-eval job: score the fine-tuned model on public benchmarks with EleutherAI's lm-evaluation-harness, loaded
as its own `lm_eval --model hf --model_args pretrained=DIR` loads it, so that the scores are the ones others report.

    from medcot.harness import lm_eval_stage
    lm_eval_stage(config, runtime)        # -> <run dir>/lm-eval/results.json (the harness's own results)

The model is the merged folder (what is served), or base + adapter when there is no merge yet (`lm_eval.model`).
Medical tasks of the harness's registry (medqa_4options, medmcqa, pubmedqa, mmlu_anatomy, mmlu_clinical_knowledge,
mmlu_college_medicine, mmlu_medical_genetics, mmlu_professional_medicine, or the group multimedqa) download their
data from the Hub; a local task (a YAML file in `lm_eval.include_path`) needs nothing but its file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from typing import Any

from medcot.config import RunConfig, save_config
from medcot.modeling import Runtime, resolve_model_path
from medcot.rundir import RunDir, StageError, write_json

log = logging.getLogger(__name__)

STAGE = "lm-eval"
RESULTS = "results.json"


def harness_model_args(config: RunConfig, run: RunDir, runtime: Runtime) -> tuple[dict[str, Any], dict[str, str], str]:
    """(model_args of the harness's `hf` model, the stage's inputs, what was scored: 'merged' or 'adapter')."""
    choice = config.lm_eval.model
    if choice == "auto":
        choice = "merged" if run.is_complete("merge") else "adapter"
    # Full precision on a CPU, the runtime's 16-bit dtype on a GPU: as the evaluate job scores.
    args: dict[str, Any] = {"dtype": runtime.dtype_name}
    if choice == "merged":
        manifest = run.require("merge", needed_by="lm-eval with lm_eval.model merged")
        return args | {"pretrained": str(run.stage("merge") / "model")}, {"merge": manifest.identity()}, choice
    manifest = run.require("train", needed_by="lm-eval")
    base = {"pretrained": resolve_model_path(config.model.name), "peft": str(run.stage("train") / "adapter")}
    if config.model.revision:
        base["revision"] = config.model.revision
    return args | base, {"train": manifest.identity()}, choice


def _task_manager(config: RunConfig):
    if importlib.util.find_spec("lm_eval") is None:
        raise StageError("lm-evaluation-harness is not installed: pip install -e '.[lm-eval]' (make setup installs it)")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=config.lm_eval.include_path)
    missing = [t for t in config.lm_eval.tasks if t not in manager.all_tasks]
    if missing:
        where = f" or in lm_eval.include_path {config.lm_eval.include_path}" if config.lm_eval.include_path else ""
        raise StageError(f"lm_eval.tasks: {', '.join(missing)} not in the harness's registry{where}; "
                         "`lm_eval ls tasks` lists the registry (medical: medqa_4options, medmcqa, pubmedqa, "
                         "mmlu_clinical_knowledge, ..., or the group multimedqa)")
    return manager


def lm_eval_stage(config: RunConfig, runtime: Runtime, force: bool = False) -> int:
    started = time.monotonic()
    cfg = config.lm_eval
    if not cfg.tasks:
        raise StageError("lm_eval.tasks is empty: name the tasks, e.g. make lm-eval TASKS=medqa_4options,pubmedqa")
    run = RunDir(config.run_dir)
    model_args, inputs, scored = harness_model_args(config, run, runtime)
    config_hash = config.section_hash("model", "lm_eval")
    if run.check_done(STAGE, config_hash, inputs, force):
        log.info("%s: already finished in %s with this config and model; nothing to do", STAGE, run.stage(STAGE))
        return 0
    manager = _task_manager(config)

    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    log.info("%s: %s on the %s model (%s)", STAGE, ", ".join(cfg.tasks), scored, model_args["pretrained"])
    results = lm_eval.simple_evaluate(
        model="hf", model_args=model_args, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
        batch_size=cfg.batch_size, device=runtime.device, limit=cfg.limit, task_manager=manager,
        apply_chat_template=cfg.apply_chat_template, log_samples=False,
    )
    log.info("%s results:\n%s", STAGE, make_table(results))
    with run.publishing(STAGE, config_hash, inputs, started=started) as (tmp, manifest):
        # The harness's own format, so that its tools (and other people's scripts) read it as they read theirs.
        (tmp / RESULTS).write_text(json.dumps(results, indent=2, default=handle_non_serializable), encoding="utf-8")
        write_json(tmp / "summary.json", {"model": scored, "tasks": list(cfg.tasks), "limit": cfg.limit,
                                          "scores": scores(results)})
        save_config(config, tmp / "config.yaml")
        manifest.extra = {"model": scored}
    log.info("%s: results in %s", STAGE, run.stage(STAGE) / RESULTS)
    return 0


def scores(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task and metric of the harness's results: value, standard error, shots and documents scored."""
    rows = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, scored, filt = key.partition(",")  # "acc,none": a metric under a filter; bare keys are counts
            if not scored or metric.endswith("_stderr") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            n = results.get("n-samples", {}).get(task, {})
            rows.append({"task": task, "metric": metric, "filter": filt, "value": value,
                         "stderr": stderr if isinstance(stderr, (int, float)) else None,
                         "n_shot": results.get("n-shot", {}).get(task), "n": n.get("effective")})
    return rows
