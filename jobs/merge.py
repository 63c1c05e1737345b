"""Merge the trained LoRA adapter into 16-bit weights that plain transformers loads.

    python jobs/merge.py --config configs/demo.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medcot.cli import parse_job_args, register_user_error, run_job  # noqa: E402


def main() -> int:
    config, args = parse_job_args("merge", __doc__)
    from medcot.modeling import BackendError, select_backend
    from medcot.prompts import TemplateError
    from medcot.rundir import StageError

    register_user_error(BackendError, StageError, TemplateError)
    # peft on the full-precision base whatever trained the adapter: the merge never imports Unsloth.
    runtime = select_backend(config.model.model_copy(update={"backend": "transformers", "load_in_4bit": False}))
    from medcot.merge import merge_stage

    return merge_stage(config, runtime, force=args.force)


if __name__ == "__main__":
    run_job(main)
