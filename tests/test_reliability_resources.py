"""Resources: CUDA out-of-memory gives a message listing the config changes that need less memory (and
evaluation retries with half the batch by itself); a full disk while saving leaves the last complete
checkpoint intact and says so.

Out-of-memory is a real `torch.OutOfMemoryError`, raised on CPU by a forward hook for batches above a size,
as the CUDA allocator raises it. A full disk is either a write that fails with ENOSPC half-way (any
machine) or a real tmpfs filled to the last byte (root only).
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import uuid

import pytest
import torch
from reliability import (
    OOM_TEXT,
    adapter_tensors,
    assert_clean_failure,
    assert_same_tensors,
    losses,
    oom_above,
    overrides,
    run,
    short_rows,
    single_thread,
    write_jsonl,
)

from medcot.config import load_config
from medcot.evaluate import evaluate_stage
from medcot.modeling import select_backend
from medcot.resources import ResourceError, memory_fixes
from medcot.training import COMPLETE_MARK, complete_checkpoints, train_stage


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "short.jsonl", short_rows(40))


# ---- out of memory in training ------------------------------------------------------------------------------

OOM_IN_TRAINING = """
    # From the 7th forward on (step 4 of 8, after checkpoint-2), a micro-batch of more than one row does not fit.
    import medcot.modeling as _m
    from reliability import oom_above
    _add_lora = _m.add_lora
    def _add_lora_oom(*a, **kw):
        model = _add_lora(*a, **kw)
        oom_above(model, max_rows=1, after_calls=6)
        return model
    _m.add_lora = _add_lora_oom
"""


@pytest.mark.slow
def test_oom_in_training_names_the_overrides_that_fit_and_keeps_the_last_checkpoint(tiny_model, data, tmp_path):
    args = overrides(tiny_model, data, tmp_path / "out", "run_name=oom")

    done = run("train", args, tmp_path, fault=OOM_IN_TRAINING)

    assert_clean_failure(done, f"CUDA out of memory during training ({OOM_TEXT})",
                         "training.per_device_train_batch_size=1 training.gradient_accumulation_steps=4",
                         "same global batch of 4 rows", "lora.use_gradient_checkpointing=unsloth",
                         "model.max_seq_length=128", "The last complete checkpoint, checkpoint-2, is intact.", codes=(1,))
    checkpoints = tmp_path / "out" / "oom" / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-2"]
    torch.load(checkpoints / "checkpoint-2" / "optimizer.pt", weights_only=True)

    # The first suggestion, as printed, fits: the same fault no longer fires and training finishes.
    fixed = run("train", [*args, "training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=4",
                          "--force"], tmp_path, fault=OOM_IN_TRAINING)

    assert fixed.returncode == 0, fixed.stderr
    assert [s for s, _ in losses(tmp_path / "out" / "oom")] == list(range(1, 9))


@pytest.mark.parametrize("batch,accumulation,expected", [
    (8, 1, "training.per_device_train_batch_size=4 training.gradient_accumulation_steps=2"),
    (3, 4, "training.per_device_train_batch_size=1 training.gradient_accumulation_steps=12"),
    (6, 2, "training.per_device_train_batch_size=3 training.gradient_accumulation_steps=4"),
])
def test_the_smaller_micro_batch_keeps_the_global_batch(batch, accumulation, expected):
    config = load_config(None, [f"training.per_device_train_batch_size={batch}",
                                f"training.gradient_accumulation_steps={accumulation}"])
    overrides_, why = memory_fixes(config, "train")[0]
    assert overrides_ == expected and f"same global batch of {batch * accumulation} rows" in why


def test_at_the_smallest_settings_oom_says_a_bigger_gpu_is_needed():
    from medcot.resources import oom_message

    config = load_config(None, ["training.per_device_train_batch_size=1", "lora.use_gradient_checkpointing=true",
                                "model.max_seq_length=128", "model.load_in_4bit=true"])
    assert "already at their smallest; use a GPU with more memory" in oom_message(config, "train", torch.OutOfMemoryError())


# ---- out of memory in evaluation: retry with half the batch ---------------------------------------------------

@pytest.fixture
def eval_config(tiny_model, data, tmp_path):
    def make(*extra: str):
        return load_config(None, overrides(tiny_model, data, tmp_path / "out", "run_name=eval-oom", "data.heldout_rows=8",
                                           "eval.heldout_limit=8", "eval.batch_size=4", *extra))
    return make


def _with_oom(monkeypatch, max_rows: int) -> list[list[int]]:
    """Every model the evaluate stage loads raises OOM above `max_rows` rows; one error counter per model."""
    import medcot.evaluate

    counters: list[list[int]] = []
    load = medcot.evaluate.load_with_adapter

    def load_then_hook(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        counters.append(oom_above(model, max_rows))
        return model, tokenizer

    monkeypatch.setattr(medcot.evaluate, "load_with_adapter", load_then_hook)
    return counters


@pytest.mark.parametrize("decoder", ["transformers", "graph"])
def test_evaluation_out_of_memory_retries_with_half_the_batch_and_gives_the_same_answers(eval_config, monkeypatch, caplog,
                                                                                         decoder):
    """For medcot's graph decoder too: the failed batch's cache buffers are given back, and a decoder for half the
    rows takes over."""
    plain = eval_config("run_name=plain", f"eval.decoder={decoder}")
    assert evaluate_stage(plain, select_backend(plain.model), "before") == 0
    counters = _with_oom(monkeypatch, max_rows=2)
    caplog.set_level("WARNING")

    config = eval_config(f"eval.decoder={decoder}")
    assert evaluate_stage(config, select_backend(config.model), "before") == 0

    (raised,) = counters
    # Once for the held-out loss and once for generation: after the first split, later batches start at 2.
    assert raised == [4, 4]
    assert caplog.text.count("CUDA out of memory on a batch of 4 rows; retrying in batches of 2") == 2

    def read(run_dir):
        rows = [json.loads(line) for line in (run_dir / "eval-before" / "generations.jsonl").read_text().splitlines()]
        return rows, json.loads((run_dir / "eval-before" / "summary.json").read_text())

    (rows, summary), (plain_rows, plain_summary) = read(config.run_dir), read(plain.run_dir)
    assert [r["raw"] for r in rows] == [r["raw"] for r in plain_rows]
    assert summary["heldout_loss"]["loss"] == pytest.approx(plain_summary["heldout_loss"]["loss"], rel=1e-5)
    assert summary["decoder"] == decoder


def test_evaluation_out_of_memory_at_one_row_names_the_eval_overrides_and_publishes_nothing(eval_config, monkeypatch):
    _with_oom(monkeypatch, max_rows=0)
    config = eval_config("eval.max_new_tokens=256")

    with pytest.raises(ResourceError) as error:
        evaluate_stage(config, select_backend(config.model), "before")

    message = str(error.value)
    for text in (f"CUDA out of memory during evaluation ({OOM_TEXT})", "eval.batch_size=2", "eval.max_new_tokens=128",
                 "model.max_seq_length=128", "model.load_in_4bit=true"):
        assert text in message
    assert "training." not in message
    assert not (config.run_dir / "eval-before").exists()


# ---- a full disk --------------------------------------------------------------------------------------------

def test_a_disk_full_while_saving_a_checkpoint_keeps_the_previous_one_and_the_rerun_resumes(tiny_model, data, tmp_path,
                                                                                           monkeypatch):
    reference = load_config(None, overrides(tiny_model, data, tmp_path / "out", "run_name=reference"))
    assert train_stage(reference, select_backend(reference.model)) == 0
    config = load_config(None, overrides(tiny_model, data, tmp_path / "out", "run_name=full"))
    save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: buffer.tell() // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(ResourceError, match=r"disk full while writing to .*checkpoints .*No space left on device.*"
                                            r"The last complete checkpoint, checkpoint-2, is intact\. .*rerun the same command"):
        train_stage(config, select_backend(config.model))
    checkpoints = config.run_dir / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-2"]
    assert not (checkpoints / "checkpoint-4" / COMPLETE_MARK).exists()
    assert not (config.run_dir / "train").exists()

    monkeypatch.undo()
    assert train_stage(config, select_backend(config.model)) == 0

    assert json.loads((config.run_dir / "train" / "summary.json").read_text())["resumed_from"] == "checkpoint-2"
    assert losses(config.run_dir) == losses(reference.run_dir)
    assert_same_tensors(adapter_tensors(config.run_dir / "train" / "adapter"), adapter_tensors(reference.run_dir / "train" / "adapter"))


def test_a_disk_full_while_publishing_a_stage_says_so_and_publishes_nothing(eval_config, monkeypatch):
    import medcot.evaluate

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(medcot.evaluate, "write_json", full)
    config = eval_config()

    with pytest.raises(ResourceError, match=r"disk full while writing to .*eval-oom .*Nothing of 'eval-before' was published"):
        evaluate_stage(config, select_backend(config.model), "before")
    assert not (config.run_dir / "eval-before").exists() and not list((config.run_dir / ".staging").iterdir())


FILL_THE_DISK_AFTER_CHECKPOINT_2 = """
    # Once checkpoint-2 is marked complete, fill the filesystem to the last byte: the next save hits a real ENOSPC.
    import os
    import medcot.training as _t
    _on_save = _t.CheckpointMarker.on_save
    def _on_save_then_fill(self, args, state, control, **kwargs):
        out = _on_save(self, args, state, control, **kwargs)
        if state.global_step == 2:
            with open(os.path.join(args.output_dir, "..", "..", "..", "filler"), "wb") as f:
                try:
                    while True:
                        f.write(b"\\0" * (1 << 16))
                        f.flush()
                except OSError:
                    pass
        return out
    _t.CheckpointMarker.on_save = _on_save_then_fill
"""


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (needs root); skipped where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=24m,mode=0755,uid={os.getuid()}", f"medcot-{uuid.uuid4().hex[:8]}",
                              str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_really_full_disk_while_saving_a_checkpoint_keeps_the_previous_one_and_the_rerun_resumes(
        tiny_model, data, tmp_path, small_disk):
    reference = tmp_path / "reference"
    ref = run("train", overrides(tiny_model, data, reference, "run_name=r", "training.save_steps=1"), tmp_path)
    assert ref.returncode == 0, ref.stderr
    args = overrides(tiny_model, data, small_disk / "out", "run_name=r", "training.save_steps=1")

    done = run("train", args, tmp_path, fault=FILL_THE_DISK_AFTER_CHECKPOINT_2)

    assert_clean_failure(done, f"disk full while writing to {small_disk / 'out' / 'r' / 'checkpoints'} (0 MiB left",
                         "The last complete checkpoint, checkpoint-2, is intact.", "rerun the same command", codes=(1,))
    assert shutil.disk_usage(small_disk).free < 1 << 16
    checkpoints = small_disk / "out" / "r" / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-1", "checkpoint-2"]
    torch.load(checkpoints / "checkpoint-2" / "optimizer.pt", weights_only=True)

    (small_disk / "filler").unlink()
    resumed = run("train", args, tmp_path)

    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint checkpoint-3 was never completed (save cut off); removed" in resumed.stderr
    assert f"resuming from {checkpoints / 'checkpoint-2'}" in resumed.stderr
    assert losses(small_disk / "out" / "r") == losses(reference / "r")
    assert_same_tensors(adapter_tensors(small_disk / "out" / "r" / "train" / "adapter"),
                        adapter_tensors(reference / "r" / "train" / "adapter"))
