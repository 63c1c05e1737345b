"""Publish the adapter and/or merged model, with a model card, to the Hugging Face Hub (push.repo_id).

    python jobs/push.py --config configs/deepseek-r1-distill-llama-8b-medical.yaml push.repo_id=you/medical-r1
    python jobs/push.py --config FILE --preflight   # only check that HF_TOKEN can write push.repo_id (seconds)
    python jobs/push.py --config FILE --dry-run     # plan + card in <run>/push-dry-run/, no network, no token

The token is HF_TOKEN (environment, .env or /run/secrets/hf_token); the Hub is HF_ENDPOINT if set.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medcot.cli import parse_job_args, register_user_error, run_job  # noqa: E402


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true", help="write the upload plan and card; touch no network")
    parser.add_argument("--preflight", action="store_true", help="only check that the token can write push.repo_id")


def main() -> int:
    config, args = parse_job_args("push", __doc__, extra=_flags)
    from medcot.push import PushError, preflight, push_stage, require_repo_id
    from medcot.rundir import StageError
    from medcot.secrets import get_secret

    register_user_error(PushError, StageError)
    token = get_secret("HF_TOKEN")
    if args.preflight:
        preflight(require_repo_id(config), token)
        return 0
    return push_stage(config, token, dry_run=args.dry_run, force=args.force)


if __name__ == "__main__":
    run_job(main)
