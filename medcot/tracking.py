"""Experiment tracking: one W&B run per medcot run, shared by the jobs that log to it.

Online when WANDB_API_KEY is set (from the environment, /run/secrets or .env), otherwise offline files
in the run directory that `wandb sync` can upload later. The run id is stored in the run directory, so
the evaluate job adds its before/after table to the same W&B run that the train job logged its loss to.
"""

from __future__ import annotations

import logging
import os
import secrets as _random

from medcot.config import RunConfig

log = logging.getLogger(__name__)


def wandb_enabled(config: RunConfig) -> bool:
    return config.tracking.report_to in ("auto", "wandb")


def configure_wandb(config: RunConfig) -> bool:
    """Set the WANDB_* variables that transformers' W&B callback and `wandb.init` read. Returns whether W&B is on."""
    if not wandb_enabled(config):
        return False
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file = run_dir / "wandb_run_id"
    if not id_file.is_file():
        id_file.write_text(f"{config.run_name[:40]}-{_random.token_hex(4)}\n")
    os.environ.update({
        "WANDB_PROJECT": config.tracking.wandb_project,
        "WANDB_RUN_ID": id_file.read_text().strip(),
        "WANDB_RESUME": "allow",
        "WANDB_DIR": str(run_dir),
        "WANDB_NAME": config.run_name,
    })
    if config.tracking.wandb_entity:
        os.environ["WANDB_ENTITY"] = config.tracking.wandb_entity
    if not os.environ.get("WANDB_API_KEY"):
        if config.tracking.report_to == "wandb":
            log.warning("tracking: report_to is wandb but WANDB_API_KEY is not set; logging offline to %s", run_dir / "wandb")
        else:
            log.info("tracking: WANDB_API_KEY not set; W&B logs offline to %s (`wandb sync` uploads it later)", run_dir / "wandb")
        os.environ["WANDB_MODE"] = "offline"
    return True

