"""Print the before/after table and (re)write the report once both evaluations exist.

    python jobs/report.py --config configs/demo.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medcot.cli import parse_job_args, register_user_error, run_job  # noqa: E402


def main() -> int:
    config, _ = parse_job_args("report", __doc__)
    from medcot.report import report_if_ready, stage_times
    from medcot.rundir import StageError

    register_user_error(StageError)
    page = report_if_ready(config)
    print(stage_times(config.run_dir))
    return 0 if page else 1


if __name__ == "__main__":
    run_job(main)
