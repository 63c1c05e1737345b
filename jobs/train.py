"""Fine-tune the model with LoRA on the CoT dataset; resumes from the last complete checkpoint.

    python jobs/train.py --config configs/deepseek-r1-distill-llama-8b-medical.yaml
    python jobs/train.py --config configs/demo.yaml training.max_steps=10
    python jobs/train.py --config FILE --help        # every key with its value
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medcot.cli import parse_job_args, register_user_error, run_job  # noqa: E402


def main() -> int:
    config, args = parse_job_args("train", __doc__)
    from medcot.data import DataError
    from medcot.modeling import BackendError, select_backend
    from medcot.rundir import StageError

    register_user_error(DataError, BackendError, StageError)
    runtime = select_backend(config.model)  # imports Unsloth, when chosen, before transformers loads
    from medcot.training import train_stage

    return train_stage(config, runtime, force=args.force)


if __name__ == "__main__":
    run_job(main)
