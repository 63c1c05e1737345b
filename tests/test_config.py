"""The config schema: defaults, overrides, refusals that name the key and the file, the recipe's values."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medcot.config import ConfigError, RunConfig, describe, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "deepseek-r1-distill-llama-8b-medical.yaml"
DEMO = ROOT / "configs" / "demo.yaml"


def test_defaults_are_the_reference_recipe():
    c = RunConfig()
    assert c.model.name == "unsloth/DeepSeek-R1-Distill-Llama-8B"
    assert (c.model.max_seq_length, c.model.load_in_4bit, c.model.dtype) == (2048, True, "auto")
    assert (c.data.path, c.data.name, c.data.split, c.data.train_rows) == (
        "FreedomIntelligence/medical-o1-reasoning-SFT", "en", "train", 500)
    assert (c.lora.r, c.lora.lora_alpha, c.lora.lora_dropout, c.lora.bias) == (16, 16, 0.0, "none")
    assert c.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (c.lora.use_gradient_checkpointing, c.lora.random_state, c.lora.use_rslora, c.lora.loftq) == ("auto", 3407, False, False)
    t = c.training
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.warmup_steps, t.max_steps) == (8, 1, 5, 60)
    assert (t.learning_rate, t.optim, t.weight_decay, t.lr_scheduler_type, t.seed, t.logging_steps) == (
        2e-4, "adamw_8bit", 0.01, "linear", 3407, 10)
    assert c.output_dir == "outputs"
    assert c.tracking.wandb_project == "Fine-tune-DeepSeek-R1-Distill-Llama-8B on Medical COT Dataset"
    assert c.eval.max_new_tokens == 1200


def test_recipe_file_matches_the_defaults_exactly():
    assert load_config(RECIPE) == RunConfig()


def test_demo_config_is_valid_and_uses_the_embedded_model():
    c = load_config(DEMO)
    assert c.model.name == "embedded:smollm2-135m-instruct"
    assert Path(ROOT / c.data.path).is_file()


def test_override_sets_nested_keys_with_yaml_types():
    c = load_config(RECIPE, ["training.max_steps=30", "lora.target_modules=[q_proj, v_proj]", "model.load_in_4bit=false"])
    assert c.training.max_steps == 30
    assert c.lora.target_modules == ["q_proj", "v_proj"]
    assert c.model.load_in_4bit is False


def test_misspelled_key_is_refused_naming_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    tree = yaml.safe_load(RECIPE.read_text())
    tree["lora"]["lora_alpa"] = tree["lora"].pop("lora_alpha")
    bad.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "lora.lora_alpa" in str(e.value) and str(bad) in str(e.value) and "unknown key" in str(e.value)


@pytest.mark.parametrize("override,key", [
    ("lora.r=0", "lora.r"),
    ("training.max_steps=-5", "training.max_steps"),
    ("training.learning_rate=fast", "training.learning_rate"),
    ("lora.lora_dropout=1.5", "lora.lora_dropout"),
    ("model.backend=vllm", "model.backend"),
    ("training.save_total_limit=1", "training.save_total_limit"),
    ("training.warmup_steps=100", "training"),
    ("run_name=../escape", "run_name"),
])
def test_impossible_values_are_refused_with_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, [override])
    assert f"- {key}" in str(e.value)


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["training.max_steps"])


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_list_is_refused(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)


def test_saved_config_round_trips(tmp_path):
    c = load_config(DEMO, ["training.max_steps=3"])
    save_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c


def test_section_hash_changes_only_with_its_sections():
    a = load_config(RECIPE)
    b = load_config(RECIPE, ["eval.max_new_tokens=10"])
    assert a.section_hash("training") == b.section_hash("training")
    assert a.section_hash("eval") != b.section_hash("eval")


def test_every_field_is_documented():
    text = describe(RunConfig())
    assert "lora.lora_alpha = 16" in text
    undocumented = [line for line in text.splitlines() if line.startswith("      ") and not line.strip()]
    assert not undocumented


def test_train_help_shows_the_recipe_values():
    out = subprocess.run([sys.executable, "jobs/train.py", "--config", str(RECIPE), "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for expected in ("model.name = unsloth/DeepSeek-R1-Distill-Llama-8B", "training.max_steps = 60",
                     "training.optim = adamw_8bit", "lora.r = 16", "data.train_rows = 500"):
        assert expected in out.stdout


def test_describe_lists_multiple_choice_sources_as_their_settings():
    text = describe(load_config(DEMO))
    assert 'eval.mcq = [{"path": "data/sample/medqa_sample.jsonl", ' in text and '"format": "auto"' in text


def test_misspelled_key_fails_the_job_before_any_import_of_the_model_stack(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.read_text().replace("max_steps: 60", "max_step: 60"))
    out = subprocess.run([sys.executable, "-X", "importtime", "jobs/train.py", "--config", str(bad)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "training.max_step: unknown key" in out.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")}
    assert imported and "transformers" not in imported and "torch" not in imported
