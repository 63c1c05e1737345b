"""Evaluate the model before or after training on held-out, showcase and multiple-choice questions.

    python jobs/evaluate.py --config configs/demo.yaml --stage before
    python jobs/evaluate.py --config configs/demo.yaml --stage after     # the merge job's folder

Writes <run dir>/eval-<stage>/ (generations.jsonl, summary.json); once both stages exist, also the
before/after report (<run dir>/report/report.html).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medcot.cli import parse_job_args, register_user_error, run_job  # noqa: E402


def add_stage(parser) -> None:
    parser.add_argument("--stage", choices=("before", "after"), required=True,
                        help="the base model, or the merged model (base + trained adapter, after the merge job)")


def main() -> int:
    config, args = parse_job_args("evaluate", __doc__, extra=add_stage)
    from medcot.data import DataError
    from medcot.merge import merged_model_config
    from medcot.modeling import BackendError, plan_eval_model, select_backend
    from medcot.prompts import TemplateError
    from medcot.rundir import StageError

    register_user_error(DataError, BackendError, StageError, TemplateError)
    evaluated = merged_model_config(config) if args.stage == "after" else config
    model_config, _ = plan_eval_model(evaluated)  # eval.weights: 4-bit or 16-bit, by the GPU's free memory
    runtime = select_backend(model_config)  # imports Unsloth, when chosen, before transformers loads
    from medcot.evaluate import evaluate_stage
    from medcot.report import report_if_ready

    code = evaluate_stage(config, runtime, args.stage, force=args.force)
    report_if_ready(config)
    return code


if __name__ == "__main__":
    run_job(main)
