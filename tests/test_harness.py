"""The lm-eval job: lm-evaluation-harness loads the merged demo model (and base + adapter) as users load it, scores a
local task offline, and its scores land beside the evaluations and in the report."""

import json

import pytest
import torch

from medcot.config import load_config
from medcot.evaluate import evaluate_stage
from medcot.harness import lm_eval_stage
from medcot.merge import merge_stage
from medcot.modeling import select_backend
from medcot.report import write_report
from medcot.rundir import StageError
from medcot.training import train_stage

from conftest import MCQ_SAMPLE, ROOT

TASK = "medcot_medqa_sample"
LOCAL_TASKS = ROOT / "data" / "lm_eval"


def own_accuracy(folder, rows) -> float:
    """The task's accuracy computed without the harness: the option letter with the highest log-likelihood after
    the task's prompt, scored by the model folder loaded with plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    correct = 0
    for row in rows:
        o = row["options"]
        context = f"Question: {row['question']}\nA. {o['A']}\nB. {o['B']}\nC. {o['C']}\nD. {o['D']}\nAnswer:"
        ids = tokenizer(context)["input_ids"]
        scores = {}
        for letter in "ABCD":
            full = tokenizer(context + " " + letter)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([full])).logits[0, :-1].log_softmax(-1)
            scores[letter] = sum(logprobs[pos, full[pos + 1]].item() for pos in range(len(ids) - 1, len(full) - 1))
        correct += max(scores, key=scores.get) == row["answer"]
    return correct / len(rows)


def sample_rows(n: int) -> list[dict]:
    return [json.loads(line) for line in MCQ_SAMPLE.read_text(encoding="utf-8").splitlines()[:n]]


@pytest.mark.slow
def test_the_harness_scores_the_merged_demo_model_as_plain_transformers_does(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the local task's data path is relative to the repository root
    config = load_config(ROOT / "configs" / "demo.yaml", [
        f"output_dir={tmp_path}", "training.max_steps=1", "training.save_steps=1", f"lm_eval.tasks={TASK}",
        "lm_eval.limit=4", "model.dtype=float32"])  # fp32: the harness's log-likelihoods and ours agree to the digit
    runtime = select_backend(config.model)
    assert train_stage(config, runtime) == 0 and merge_stage(config, runtime) == 0

    assert lm_eval_stage(config, runtime) == 0

    stage = config.run_dir / "lm-eval"
    results = json.loads((stage / "results.json").read_text())
    merged = config.run_dir / "merge" / "model"
    assert results["config"]["model_args"]["pretrained"] == str(merged)
    assert results["n-samples"][TASK]["effective"] == 4
    assert results["results"][TASK]["acc,none"] == pytest.approx(own_accuracy(merged, sample_rows(4)))
    summary = json.loads((stage / "summary.json").read_text())
    assert summary["model"] == "merged" and (stage / "manifest.json").is_file()


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory, tiny_model):
    """A tiny run with evaluate-before and a trained adapter, and no merge."""
    from conftest import SAMPLE

    out = tmp_path_factory.mktemp("harness")
    config = load_config(None, [
        f"model.name={tiny_model}", "model.max_seq_length=1024", f"data.path={SAMPLE}", "data.train_rows=8",
        "data.heldout_rows=2", f"output_dir={out}", "run_name=h", "lora.use_gradient_checkpointing=false",
        "training.max_steps=1", "training.warmup_steps=0", "training.optim=adamw_torch", "tracking.report_to=none",
        "eval.max_new_tokens=4", "eval.showcase_questions=[]", f"lm_eval.tasks={TASK}", "lm_eval.limit=4",
        f"lm_eval.include_path={LOCAL_TASKS}",
    ])
    runtime = select_backend(config.model)
    assert evaluate_stage(config, runtime, "before") == 0 and train_stage(config, runtime) == 0
    return config


def test_without_a_merge_the_harness_scores_base_plus_adapter(evaluated_run, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert lm_eval_stage(evaluated_run, select_backend(evaluated_run.model)) == 0
    args = json.loads((evaluated_run.run_dir / "lm-eval" / "results.json").read_text())["config"]["model_args"]
    assert args["peft"] == str(evaluated_run.run_dir / "train" / "adapter")
    assert args["pretrained"] == evaluated_run.model.name


def test_the_report_shows_the_harness_scores_when_they_exist(evaluated_run, monkeypatch):
    monkeypatch.chdir(ROOT)
    runtime = select_backend(evaluated_run.model)
    lm_eval_stage(evaluated_run, runtime)  # base + adapter: no merge yet
    assert merge_stage(evaluated_run, runtime) == 0 and evaluate_stage(evaluated_run, runtime, "after") == 0
    accuracy = json.loads((evaluated_run.run_dir / "lm-eval" / "results.json").read_text())["results"][TASK]["acc,none"]
    md, page = write_report(evaluated_run.run_dir)
    for text in (md.read_text(encoding="utf-8"), page.read_text(encoding="utf-8")):
        assert "Public benchmarks (lm-evaluation-harness)" in text and "the base model with the trained adapter" in text
        assert "Only the first 4 documents of each task were scored" in text
    table = [line for line in md.read_text(encoding="utf-8").splitlines() if line.startswith(f"| {TASK} |")]
    assert [line.split(" | ")[1:3] for line in table] == [["acc", f"{accuracy:.3f}"], ["acc_norm", table[1].split(" | ")[2]]]


def test_a_task_outside_the_registry_is_refused_before_any_model_loads(evaluated_run):
    config = evaluated_run.model_copy(update={"lm_eval": evaluated_run.lm_eval.model_copy(
        update={"tasks": ["medqa_4option"]})})
    with pytest.raises(StageError, match=r"lm_eval.tasks: medqa_4option not in the harness's registry or in "
                                         r"lm_eval.include_path .*`lm_eval ls tasks`"):
        lm_eval_stage(config, select_backend(config.model), force=True)


def test_tasks_may_be_given_as_a_comma_separated_list():
    config = load_config(None, ["lm_eval.tasks=medqa_4options, pubmedqa,mmlu_anatomy"])
    assert config.lm_eval.tasks == ["medqa_4options", "pubmedqa", "mmlu_anatomy"]
