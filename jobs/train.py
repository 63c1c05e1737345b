"""Fine-tune the model with LoRA on the CoT dataset; resumes from the last complete checkpoint.

    python jobs/train.py --config configs/deepseek-r1-distill-llama-8b-medical.yaml
    python jobs/train.py --config configs/demo.yaml training.max_steps=10
    python jobs/train.py --config FILE --help        # every key with its value
    GPUS=2 python jobs/train.py --config FILE         # data-parallel: restarts itself under torchrun
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medcot.cli import ConfigError, data_parallel_argv, parse_job_args, register_user_error, run_job  # noqa: E402


def main() -> int:
    config, args = parse_job_args("train", __doc__)
    from medcot.data import DataError
    from medcot.modeling import BackendError, select_backend
    from medcot.prompts import TemplateError
    from medcot.rundir import StageError

    register_user_error(DataError, BackendError, StageError, TemplateError)
    runtime = select_backend(config.model)  # imports Unsloth, when chosen, before transformers loads
    from medcot.training import SetupHeap, train_stage

    SetupHeap.freeze()  # the imports' heap, out of the set-up's gc passes; thawed before train()
    try:
        return train_stage(config, runtime, force=args.force)
    finally:
        SetupHeap.thaw()


if __name__ == "__main__":
    try:
        launch = data_parallel_argv(__file__, sys.argv[1:], os.environ)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if launch:
        os.execv(launch[0], launch)  # torchrun starts one worker per GPU; each runs this file again
    run_job(main)
