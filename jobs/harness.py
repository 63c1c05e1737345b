"""Score the fine-tuned model on public benchmarks with lm-evaluation-harness (the tasks of its registry, or local ones).

    python jobs/harness.py --config configs/demo.yaml lm_eval.tasks=medcot_medqa_sample     # offline, after merge
    make lm-eval TASKS=medqa_4options,medmcqa,pubmedqa,mmlu_clinical_knowledge              # registry tasks: Hub data

Writes <run dir>/lm-eval/ (results.json in the harness's format, summary.json); the report shows the scores. Run it
from the repository root: a local task's data path is relative to where the job runs.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medcot.cli import parse_job_args, register_user_error, run_job  # noqa: E402


def main() -> int:
    config, args = parse_job_args("harness", __doc__)
    from medcot.modeling import BackendError, select_backend
    from medcot.rundir import StageError

    register_user_error(BackendError, StageError)
    runtime = select_backend(config.model.model_copy(update={"load_in_4bit": False}))  # the harness loads 16-bit
    from medcot.harness import lm_eval_stage
    from medcot.report import report_if_ready

    code = lm_eval_stage(config, runtime, force=args.force)
    report_if_ready(config)  # the report shows the scores once both evaluations exist
    return code


if __name__ == "__main__":
    run_job(main)
