"""Atomic, idempotent stages: a stage stopped at any point leaves no published result or a complete one,
the next stage refuses an unfinished input and names the job to run, and a rerun finishes the work.
A finished stage rerun with the same config does nothing; with another config it refuses, or with
--force redoes it whole, never mixing old and new files.

Faults come two ways: an exception raised in-process in the middle of a write (fast), and a SIGKILL of
the real job (`jobs/<job>.py` in a subprocess) at a chosen point (slow: ~10 s of imports each).
"""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
from reliability import (
    assert_clean_failure,
    kill_when_called,
    overrides,
    run,
    short_rows,
    single_thread,
    write_jsonl,
)
from safetensors.torch import load_file

from medcot.config import load_config
from medcot.evaluate import STAGE_SECTIONS as EVAL_SECTIONS
from medcot.evaluate import evaluate_stage
from medcot.merge import merge_stage
from medcot.modeling import select_backend
from medcot.push import push_stage
from medcot.rundir import MANIFEST, RunDir, StageError
from medcot.training import STAGE_SECTIONS as TRAIN_SECTIONS
from medcot.training import train_stage

# What a published stage holds, at least; a published folder missing any of these is a broken promise.
EXPECTED = {
    "eval-before": ["generations.jsonl", "summary.json", "config.yaml"],
    "train": ["adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
              "summary.json", "config.yaml"],
    "eval-after": ["generations.jsonl", "summary.json", "config.yaml"],
    "merge": ["model/config.json", "model/model.safetensors", "model/tokenizer.json",
              "adapter/adapter_model.safetensors", "config.yaml"],
    "push-dry-run": ["push-plan.json", "README.md", "medcot.json"],
}
SECTIONS = {"eval-before": EVAL_SECTIONS, "eval-after": EVAL_SECTIONS, "train": TRAIN_SECTIONS,
            "merge": ("model", "merge")}
RUN = "stages"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with single_thread():
        yield



def assert_all_or_nothing(run_dir) -> None:
    """Each stage folder is absent, or published whole: manifest, every file, every file readable, and
    the config it holds is the one its manifest names (no mixture of two runs)."""
    for stage, files in EXPECTED.items():
        folder = run_dir / stage
        if not folder.exists():
            continue
        assert (folder / MANIFEST).is_file(), f"{stage} is published without {MANIFEST}"
        manifest = json.loads((folder / MANIFEST).read_text())
        missing = [f for f in files if not (folder / f).is_file()]
        assert not missing, f"published {stage} lacks {missing}"
        for path in folder.rglob("*.json"):
            json.loads(path.read_text())
        for path in folder.rglob("*.jsonl"):
            [json.loads(line) for line in path.read_text().splitlines()]
        for path in folder.rglob("*.safetensors"):
            load_file(path)
        if stage in SECTIONS:
            saved = load_config(folder / "config.yaml")
            assert saved.section_hash(*SECTIONS[stage]) == manifest["config_hash"], f"{stage} mixes two configs"


def leftovers(run_dir, stage: str) -> list[str]:
    """Unpublished copies of `stage` (staging folders, a result moved aside): what a killed run leaves."""
    staging = [p.name for p in (run_dir / ".staging").glob(f"{stage}-*")] if (run_dir / ".staging").is_dir() else []
    return staging + [p.name for p in run_dir.glob(f".old-{stage}-*")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "short.jsonl", short_rows(40))


@pytest.fixture(scope="module")
def finished(tiny_model, data, tmp_path_factory):
    """A run with every stage published (in-process: seconds), copied by each test that needs it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    config = load_config(None, overrides(tiny_model, data, out, f"run_name={RUN}", "training.max_steps=4"))
    runtime = select_backend(config.model)
    assert evaluate_stage(config, runtime, "before") == 0
    assert train_stage(config, runtime) == 0
    assert merge_stage(config, runtime) == 0
    assert evaluate_stage(config, runtime, "after") == 0
    assert push_stage(config, None, dry_run=True) == 0
    assert_all_or_nothing(config.run_dir)
    return out


class Workdir:
    """A copy of the finished run, and its config with extra overrides."""

    def __init__(self, tiny_model, data, out):
        self.tiny_model, self.data, self.out = tiny_model, data, out
        self.run_dir = out / RUN

    def args(self, *extra: str) -> list[str]:
        return overrides(self.tiny_model, self.data, self.out, f"run_name={RUN}", "training.max_steps=4", *extra)

    def config(self, *extra: str):
        return load_config(None, self.args(*extra))


@pytest.fixture
def workdir(finished, tiny_model, data, tmp_path) -> Workdir:
    shutil.copytree(finished, tmp_path / "out")
    return Workdir(tiny_model, data, tmp_path / "out")


def runner(stage: str):
    """stage name -> a function (config, force) that runs it in-process."""
    return {
        "eval-before": lambda c, force=False: evaluate_stage(c, select_backend(c.model), "before", force),
        "train": lambda c, force=False: train_stage(c, select_backend(c.model), force),
        "merge": lambda c, force=False: merge_stage(c, select_backend(c.model), force),
        "eval-after": lambda c, force=False: evaluate_stage(c, select_backend(c.model), "after", force),
        "push-dry-run": lambda c, force=False: push_stage(c, None, dry_run=True, force=force),
    }[stage]


# ---- an exception in the middle of a write: nothing published, the earlier result untouched -------------

class Injected(RuntimeError):
    pass


def _raise_after(original):
    def fault(*args, **kwargs):
        original(*args, **kwargs)
        raise Injected("fault injected after a partial write")
    return fault


def _raise_before(original):
    def fault(*args, **kwargs):
        raise Injected("fault injected before the write")
    return fault


def _truncated_weights(original):
    def fault(config, runtime, adapter_dir, out_dir):
        original(config, runtime, adapter_dir, out_dir)
        weights = out_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # half-written weights, as a full disk leaves them
        raise Injected("fault injected after a partial write")
    return fault


def _manifest_fails(original):
    def fault(path, data):
        if path.name == MANIFEST:
            path.with_name(path.name + ".tmp").write_text("{\"stage\": ")
            raise Injected("fault injected while writing the manifest")
        return original(path, data)
    return fault


# (stage, what is patched, how): each a point inside the stage's write where it can fail.
IN_PROCESS_FAULTS = [
    ("eval-before", "medcot.evaluate.generate", _raise_before),
    ("eval-before", "medcot.evaluate.write_json", _raise_after),  # generations.jsonl and summary.json written
    ("train", "medcot.training.save_adapter", _raise_after),  # adapter written, summary not
    ("train", "medcot.training.write_json", _raise_after),  # adapter and summary written, config not
    ("eval-after", "medcot.evaluate.write_json", _raise_after),
    ("merge", "medcot.merge.merge_adapter", _truncated_weights),  # weights cut short
    ("merge", "medcot.merge.save_config", _raise_after),  # everything but the manifest written
    ("push-dry-run", "medcot.push._write_redacted_json", _raise_after),  # plan written, card not
    ("train", "medcot.rundir._write_json_atomic", _manifest_fails),  # everything but a whole manifest
]


def _patch(monkeypatch, target: str, how) -> None:
    import importlib

    module, name = target.rsplit(".", 1)
    mod = importlib.import_module(module)
    original = getattr(mod, name)
    monkeypatch.setattr(mod, name, how(original))


@pytest.mark.parametrize("stage,target,how", IN_PROCESS_FAULTS,
                         ids=[f"{s}:{t.rsplit('.', 1)[1]}:{h.__name__.strip('_')}" for s, t, h in IN_PROCESS_FAULTS])
def test_a_stage_failing_mid_write_publishes_nothing_and_a_rerun_completes_it(workdir, monkeypatch, stage, target, how):
    run_dir = workdir.run_dir
    shutil.rmtree(run_dir / stage)
    _patch(monkeypatch, target, how)

    with pytest.raises(Injected):
        runner(stage)(workdir.config())

    assert not (run_dir / stage).exists()
    assert leftovers(run_dir, stage) == []  # the staging folder was removed on the way out
    assert_all_or_nothing(run_dir)
    monkeypatch.undo()
    assert runner(stage)(workdir.config()) == 0
    assert RunDir(run_dir).is_complete(stage)
    assert_all_or_nothing(run_dir)


@pytest.mark.parametrize("stage,change", [
    ("eval-before", "eval.max_new_tokens=4"), ("train", "training.learning_rate=5e-4"), ("merge", "merge.dtype=bfloat16"),
])
def test_a_failed_force_redo_keeps_the_previous_result_whole(workdir, monkeypatch, stage, change):
    run_dir = workdir.run_dir
    before = (run_dir / stage / MANIFEST).read_bytes()
    target = {"eval-before": "medcot.evaluate.write_json", "train": "medcot.training.write_json",
              "merge": "medcot.merge.save_config"}[stage]
    _patch(monkeypatch, target, _raise_after)

    with pytest.raises(Injected):
        runner(stage)(workdir.config(change), force=True)

    assert (run_dir / stage / MANIFEST).read_bytes() == before
    assert_all_or_nothing(run_dir)


# ---- idempotence: same config -> nothing to do; another config -> refused, or redone whole with --force -----

CHANGES = {
    "eval-before": ("eval.max_new_tokens=4", "config"),
    "train": ("training.learning_rate=5e-4", "config"),
    "merge": ("merge.dtype=bfloat16", "config"),
}


def test_evaluate_after_scores_the_merged_folder_not_the_adapter(workdir):
    run_dir = workdir.run_dir
    rows = (run_dir / "eval-after" / "generations.jsonl").read_text()
    shutil.rmtree(run_dir / "train" / "adapter")  # what evaluate-after loads must be what the push job ships

    assert runner("eval-after")(workdir.config(), force=True) == 0

    assert (run_dir / "eval-after" / "generations.jsonl").read_text() == rows
    assert json.loads((run_dir / "eval-after" / "summary.json").read_text())["model"] == "merged"


@pytest.mark.parametrize("stage", ["eval-before", "train", "eval-after", "merge"])
def test_rerunning_a_finished_stage_with_the_same_config_does_nothing_and_says_so(workdir, caplog, stage):
    run_dir = workdir.run_dir
    files = {p: p.read_bytes() for p in (run_dir / stage).rglob("*") if p.is_file()}
    caplog.set_level("INFO")

    assert runner(stage)(workdir.config()) == 0

    assert "nothing to do" in caplog.text
    assert {p: p.read_bytes() for p in (run_dir / stage).rglob("*") if p.is_file()} == files


@pytest.mark.parametrize("stage", sorted(CHANGES))
def test_a_changed_config_is_refused_without_force_and_redone_whole_with_it(workdir, stage):
    run_dir = workdir.run_dir
    change, what = CHANGES[stage]
    old = json.loads((run_dir / stage / MANIFEST).read_text())

    with pytest.raises(StageError, match=rf"'{stage}' .* different {what}; pass --force to redo it"):
        runner(stage)(workdir.config(change))
    assert json.loads((run_dir / stage / MANIFEST).read_text()) == old

    assert runner(stage)(workdir.config(change), force=True) == 0

    new = json.loads((run_dir / stage / MANIFEST).read_text())
    assert new["config_hash"] == workdir.config(change).section_hash(*SECTIONS[stage]) != old["config_hash"]
    assert_all_or_nothing(run_dir)
    if stage == "eval-before":
        rows = [json.loads(line) for line in (run_dir / stage / "generations.jsonl").read_text().splitlines()]
        assert rows and all(r["generated_tokens"] <= 4 for r in rows)
    if stage == "merge":
        assert {t.dtype for t in load_file(run_dir / "merge" / "model" / "model.safetensors").values()} == {torch.bfloat16}


def test_a_retrained_adapter_makes_the_stages_built_on_it_refuse_until_forced(workdir):
    run_dir = workdir.run_dir
    assert train_stage(workdir.config("training.learning_rate=5e-4"), select_backend(workdir.config().model), force=True) == 0
    config = workdir.config("training.learning_rate=5e-4")

    for stage, needs in (("merge", "train"), ("eval-after", "merge")):  # the chain's order: each refuses the new input
        with pytest.raises(StageError, match=rf"'{stage}' .* different inputs \({needs}\); pass --force"):
            runner(stage)(config)
        assert runner(stage)(config, force=True) == 0
        assert json.loads((run_dir / stage / MANIFEST).read_text())["inputs"][needs] == RunDir(run_dir).manifest(needs).identity()


def test_an_edited_data_file_is_a_changed_input(workdir, data):
    original = data.read_bytes()
    try:
        write_jsonl(data, short_rows(40)[:-1] + [short_rows(41)[-1]])  # one row replaced, same file name
        with pytest.raises(StageError, match=r"'eval-before' .* different inputs \(data\)"):
            runner("eval-before")(workdir.config())
    finally:
        data.write_bytes(original)


@pytest.mark.parametrize("stage,needs,job", [
    ("merge", "train", "the train job"), ("eval-after", "merge", "the merge job"),
    ("push-dry-run", "merge", "the merge job"),
])
def test_a_stage_refuses_an_unfinished_input_and_names_the_job_to_run(workdir, stage, needs, job):
    run_dir = workdir.run_dir
    (run_dir / needs / MANIFEST).unlink()  # as a job killed before publishing would leave it, were it renamed

    with pytest.raises(StageError, match=rf"needs the '{needs}' stage, but .* is incomplete \(no manifest.json\); run {job}"):
        runner(stage)(workdir.config())


# ---- SIGKILL of the real job at chosen points -------------------------------------------------------------

KILL_AT_PUBLISH = kill_when_called("medcot.rundir", "RunDir._swap_in")  # staging complete, manifest written
EVAL_BEFORE, EVAL_AFTER = ["evaluate", "--stage", "before"], ["evaluate", "--stage", "after"]
SIGKILL_POINTS = [
    # (stage, job and its flags, where it is killed, inside the stage's write?, the stage that must then
    # refuse to start, the job it must name)
    ("train", ["train"], kill_when_called("medcot.training", "save_adapter", after=True), True, "merge", "the train job"),
    ("train", ["train"], KILL_AT_PUBLISH, True, "merge", "the train job"),
    ("eval-before", EVAL_BEFORE, kill_when_called("medcot.evaluate", "generate"), False, None, None),
    ("eval-before", EVAL_BEFORE, kill_when_called("medcot.evaluate", "write_json"), True, None, None),
    ("eval-after", EVAL_AFTER, KILL_AT_PUBLISH, True, None, None),
    ("merge", ["merge"], kill_when_called("medcot.merge", "merge_adapter", after=True), True, "eval-after", "the merge job"),
    ("merge", ["merge"], KILL_AT_PUBLISH, True, "push-dry-run", "the merge job"),
    ("push-dry-run", ["push", "--dry-run"], kill_when_called("medcot.push", "_write_redacted_json", after=True), True,
     None, None),
    ("push-dry-run", ["push", "--dry-run"], KILL_AT_PUBLISH, True, None, None),
]
SIGKILL_IDS = ["train:after-adapter", "train:at-rename", "eval-before:generating", "eval-before:writing",
               "eval-after:at-rename", "merge:after-weights", "merge:at-rename", "push-dry-run:after-plan",
               "push-dry-run:at-rename"]


@pytest.mark.slow
@pytest.mark.parametrize("stage,job,fault,mid_write,consumer,producer", SIGKILL_POINTS, ids=SIGKILL_IDS)
def test_sigkill_of_a_job_mid_stage_leaves_nothing_published_and_the_rerun_completes(
        workdir, tmp_path, stage, job, fault, mid_write, consumer, producer):
    run_dir = workdir.run_dir
    shutil.rmtree(run_dir / stage)
    if stage == "train":  # start training over, so the kill comes after real steps
        shutil.rmtree(run_dir / "checkpoints")

    done = run(job[0], [*job[1:], *workdir.args()], tmp_path, fault=fault)

    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not (run_dir / stage).exists()
    assert bool(leftovers(run_dir, stage)) == mid_write  # a kill inside the write leaves an unpublished copy
    assert_all_or_nothing(run_dir)
    if consumer:
        with pytest.raises(StageError, match=rf"needs the '{stage}' stage, but .* does not exist; run {producer}"):
            runner(consumer)(workdir.config())

    assert runner(stage)(workdir.config()) == 0

    assert RunDir(run_dir).is_complete(stage)
    assert leftovers(run_dir, stage) == []  # the killed run's copy is cleaned up, not left to fill the disk
    assert_all_or_nothing(run_dir)


SIGKILL_BETWEEN_RENAMES = """
    # --force redo: the old result is moved aside (first rename); die before the new one takes its name.
    import os, signal
    _replace = os.replace
    def _die_after_moving_aside(src, dst, *a, **kw):
        _replace(src, dst, *a, **kw)
        if os.path.basename(str(dst)).startswith(".old-"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = _die_after_moving_aside
"""


@pytest.mark.slow
def test_sigkill_between_the_two_renames_of_a_force_redo_leaves_no_mixture(workdir, tmp_path):
    run_dir = workdir.run_dir

    done = run("merge", [*workdir.args("merge.dtype=bfloat16"), "--force"], tmp_path, fault=SIGKILL_BETWEEN_RENAMES)

    assert done.returncode == -signal.SIGKILL
    assert not (run_dir / "merge").exists()  # neither the old nor the new: redone on the next run
    assert_all_or_nothing(run_dir)
    refused = run("push", ["--dry-run", *workdir.args("merge.dtype=bfloat16")], tmp_path)
    assert_clean_failure(refused, "needs the 'merge' stage", "does not exist; run the merge job", codes=(1,))

    assert runner("merge")(workdir.config("merge.dtype=bfloat16")) == 0

    assert leftovers(run_dir, "merge") == []
    assert_all_or_nothing(run_dir)
