"""Secrets (HF and W&B tokens): read from the environment, `/run/secrets/*` or `.env`, never from configs.

Every value found is registered with a logging filter that masks it, so a token that ends up in an
exception or a library's log line is printed as `***`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dotenv import dotenv_values

SECRET_NAMES = ("HF_TOKEN", "WANDB_API_KEY")
MASK = "***"

_known: set[str] = set()


def get_secret(name: str, dotenv_path: Path | None = None) -> str | None:
    """The secret `name` from, in order: the environment, `/run/secrets/<name>` (compose secrets, in
    either case), the file named by `<name>_PATH` (huggingface_hub's `HF_TOKEN_PATH` convention), `.env`."""
    value = os.environ.get(name)
    if not value:
        secrets_dir = Path(os.environ.get("MEDCOT_SECRETS_DIR", "/run/secrets"))
        candidates = [secrets_dir / name.lower(), secrets_dir / name]
        if os.environ.get(f"{name}_PATH"):
            candidates.append(Path(os.environ[f"{name}_PATH"]))
        for candidate in candidates:
            if candidate.is_file():
                value = candidate.read_text(encoding="utf-8").strip()
                if value:
                    break
    if not value:
        env_file = dotenv_path or Path(".env")
        if env_file.is_file():
            value = dotenv_values(env_file).get(name)
    if value:
        value = value.strip()
        register(value)
    return value or None


def load_secrets_into_env(dotenv_path: Path | None = None) -> dict[str, bool]:
    """Resolve every known secret and export it to the environment for the libraries that read it there
    (huggingface_hub reads HF_TOKEN, wandb reads WANDB_API_KEY). Returns which ones were found."""
    found = {}
    for name in SECRET_NAMES:
        value = get_secret(name, dotenv_path)
        if value:
            os.environ[name] = value
        found[name] = bool(value)
    return found


def register(value: str) -> None:
    # Short values would mask innocent text everywhere; real tokens are long.
    if value and len(value) >= 8:
        _known.add(value)


def redact(text: str) -> str:
    for value in _known:
        if value in text:
            text = text.replace(value, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Masks registered secrets in log records, including their arguments and tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _known:
            record.msg = redact(record.getMessage())
            record.args = None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True
