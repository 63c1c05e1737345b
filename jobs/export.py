"""Write the merged model as GGUF files (export.types) with an Ollama Modelfile, for llama.cpp, Ollama and LM Studio.

    python jobs/export.py --config configs/demo.yaml              # after the merge job: outputs/<run>/export/
    python jobs/export.py --config FILE export.types=[q8_0,f16]  # one file per type
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medcot.cli import parse_job_args, register_user_error, run_job  # noqa: E402


def main() -> int:
    config, args = parse_job_args("export", __doc__)
    from medcot.export import export_stage
    from medcot.modeling import BackendError
    from medcot.rundir import StageError

    register_user_error(BackendError, StageError)
    return export_stage(config, force=args.force)


if __name__ == "__main__":
    run_job(main)
