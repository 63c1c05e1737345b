"""The GPU-VM preflight (`make doctor`): each check on real tool output, and the fix it prints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from medcot.config import load_config
from medcot.doctor import (
    DEFAULT_IMAGE_CUDA,
    Needs,
    check_container_toolkit,
    check_disk,
    check_docker,
    check_driver,
    check_engine,
    check_gpu_memory,
    check_tokens,
    estimate_needs,
    model_params_b,
    params_from_hf_config,
    parse_nvidia_smi,
    run_checks,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "deepseek-r1-distill-llama-8b-medical.yaml"

# `nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.free --format=csv,noheader,nounits`
# as printed on an H100 VM (2026-11-25); the others are the same format with other cards.
H100 = "0, NVIDIA H100 80GB HBM3, 580.159.04, 81559, 81079\n"
TWO_L4 = "0, NVIDIA L4, 570.133.20, 23034, 22481\n1, NVIDIA L4, 570.133.20, 23034, 23034\n"
SMALL_GPU = "0, NVIDIA GeForce RTX 3060 Laptop GPU, 575.64.03, 6144, 5920\n"
NO_MEMORY_FIGURES = "0, GRID A100-40C, 570.124.06, [N/A], [N/A]\n"
# What nvidia-smi prints when the driver is installed but its kernel module is not loaded.
SMI_NOT_LOADED = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the "
                  "latest NVIDIA driver is installed and running.")
# `docker info --format '{{json .Runtimes}}'` after `nvidia-ctk runtime configure --runtime=docker`.
RUNTIMES_WITH_NVIDIA = ('{"io.containerd.runc.v2":{"path":"runc","status":{}},"nvidia":{"path":'
                        '"nvidia-container-runtime","status":{}},"runc":{"path":"runc","status":{}}}')
RUNTIMES_PLAIN = '{"io.containerd.runc.v2":{"path":"runc","status":{}},"runc":{"path":"runc","status":{}}}'

# Shapes from the models' config.json on the Hub.
LLAMA_31_8B = {"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336, "vocab_size": 128256,
               "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}
SMOLLM2_135M = {"hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536, "vocab_size": 49152,
                "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True}


@pytest.fixture
def recipe():
    return load_config(RECIPE)


def test_nvidia_smi_rows_parse_into_gpus():
    gpus = parse_nvidia_smi(TWO_L4)
    assert [(g.index, g.name, g.driver, g.memory_total_mib, g.memory_free_mib) for g in gpus] == [
        (0, "NVIDIA L4", "570.133.20", 23034, 22481), (1, "NVIDIA L4", "570.133.20", 23034, 23034)]


def test_nvidia_smi_unavailable_memory_parses_as_unknown():
    (gpu,) = parse_nvidia_smi(NO_MEMORY_FIGURES)
    assert gpu.memory_total_mib is None and gpu.memory_free_mib is None


def test_driver_new_enough_for_the_image_passes():
    check = check_driver(H100, "", DEFAULT_IMAGE_CUDA)
    assert check.status == "ok"
    assert "580.159.04" in check.detail and "580.65.06" in check.detail


def test_no_nvidia_smi_fails_with_the_install_fix():
    check = check_driver(None, "", DEFAULT_IMAGE_CUDA)
    assert check.status == "fail"
    assert "nvidia-smi not found" in check.detail
    assert "install the NVIDIA driver, version 580.65.06 or newer" in check.fix


def test_driver_not_loaded_fails_with_the_reboot_fix():
    check = check_driver(None, SMI_NOT_LOADED, DEFAULT_IMAGE_CUDA)
    assert check.status == "fail"
    assert "couldn't communicate" in check.detail
    assert "reboot" in check.fix


def test_driver_too_old_for_the_image_cuda_says_to_upgrade_it():
    check = check_driver(TWO_L4, "", DEFAULT_IMAGE_CUDA)
    assert check.status == "fail"
    assert "570.133.20 is older than the 580.65.06 that the image's CUDA 13.0 needs" in check.detail
    assert "upgrade the driver to 580.65.06" in check.fix


def test_engine_23_or_newer_passes_whatever_the_host_users():
    assert check_engine("28.2.2", host_has_image_uid=False).status == "ok"


def test_engine_20_10_passes_where_the_host_has_uid_1000():
    check = check_engine("20.10.24+dfsg1", host_has_image_uid=True)
    assert check.status == "ok" and "20.10.24" in check.detail


def test_engine_20_10_without_a_host_uid_1000_fails_with_both_fixes():
    check = check_engine("20.10.24+dfsg1", host_has_image_uid=False)
    assert check.status == "fail"
    assert "uid 1000" in check.detail
    assert "upgrade Docker Engine to 23.0" in check.fix and "sudo useradd --uid 1000" in check.fix


def test_engine_check_waits_for_a_daemon():
    assert check_engine(None, host_has_image_uid=True).status == "skip"


def test_params_of_llama_31_8b_shape_match_its_published_count():
    assert params_from_hf_config(LLAMA_31_8B) == 8_030_261_248


def test_params_of_tied_smollm2_135m_shape_match_its_published_count():
    assert params_from_hf_config(SMOLLM2_135M) == 134_515_008


def test_local_model_size_comes_from_its_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    params_b, source = model_params_b(str(tmp_path))
    assert params_b == pytest.approx(8.03, abs=0.01)
    assert source.endswith("config.json")


@pytest.mark.parametrize(("name", "params_b"), [
    ("unsloth/DeepSeek-R1-Distill-Llama-8B", 8.03),
    ("embedded:smollm2-135m-instruct", 0.135),
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.5),
    ("unsloth/Meta-Llama-3.1-8B-bnb-4bit", 8.0),  # '4bit' is not the size
    ("HuggingFaceTB/SmolLM2-360M", 0.36),
])
def test_model_size_from_table_or_name(name, params_b):
    assert model_params_b(name)[0] == pytest.approx(params_b)


def test_model_of_unknown_size_gives_no_estimate():
    assert model_params_b("someone/medical-model") is None
    assert estimate_needs(load_config(RECIPE, ["model.name=someone/medical-model"])) is None


def test_reference_recipe_needs_about_its_measured_peak_with_checkpointing(recipe):
    # measured on an H100 with Unsloth's offloaded checkpointing: 9.9 GiB (10.6 GB) at 8 x 2048, 6.8 GiB (7.3 GB) at
    # 2 x 2048; the recipe is 8 rows a micro-batch.
    needs = estimate_needs(recipe)
    assert needs.params_b == pytest.approx(8.03)
    assert 10.0 < Needs.total(needs.gpu) < 11.5
    assert needs.gpu["4-bit weights"] == pytest.approx(8.03 * 0.55)
    two_rows = estimate_needs(load_config(RECIPE, ["training.per_device_train_batch_size=2"]))
    assert 7.0 < Needs.total(two_rows.gpu) < 8.0


def test_reference_recipe_disk_needs_count_downloads_and_the_merged_model(recipe):
    needs = estimate_needs(recipe)
    assert needs.hf_cache["4-bit download"] == pytest.approx(6.0, abs=0.1)
    assert needs.outputs["merged 16-bit model"] == pytest.approx(16.06)
    assert 35 < Needs.total(needs.hf_cache) + Needs.total(needs.outputs) < 45


def test_without_checkpointing_the_recipe_needs_about_its_measured_peak(recipe):
    # measured on an H100 with no checkpointing: 20.8 GiB (22.3 GB) peak at 2 x 2048, 66.2 GiB (71.1 GB) at 8 x 2048
    off = estimate_needs(load_config(RECIPE, ["lora.use_gradient_checkpointing=false"]))
    assert 70.0 < Needs.total(off.gpu) < 80.0
    two_rows = estimate_needs(load_config(RECIPE, ["lora.use_gradient_checkpointing=false",
                                                   "training.per_device_train_batch_size=2"]))
    assert 21.0 < Needs.total(two_rows.gpu) < 26.0
    assert Needs.total(estimate_needs(recipe).gpu) < 11.5  # auto: sized as checkpointed, its fallback


def test_longer_sequences_need_more_gpu_memory(recipe):
    longer = load_config(RECIPE, ["model.max_seq_length=4096"])
    assert Needs.total(estimate_needs(longer).gpu) > Needs.total(estimate_needs(recipe).gpu)


def test_recipe_fits_an_h100_and_an_l4(recipe):
    assert check_gpu_memory(H100, estimate_needs(recipe)).status == "ok"
    assert check_gpu_memory(TWO_L4, estimate_needs(recipe)).status == "ok"


def test_recipe_on_a_6_gb_gpu_fails_with_the_knobs_that_lower_memory(recipe):
    check = check_gpu_memory(SMALL_GPU, estimate_needs(recipe))
    assert check.status == "fail"
    assert "6.4 GB" in check.detail and "estimated" in check.detail
    assert "model.max_seq_length" in check.fix and "per_device_train_batch_size" in check.fix


def test_gpu_memory_without_nvidia_smi_is_skipped_not_failed(recipe):
    assert check_gpu_memory(None, estimate_needs(recipe)).status == "skip"


def test_disk_with_an_impossible_requirement_fails_naming_the_folder(tmp_path):
    check = check_disk([("merged 16-bit model", tmp_path, 1e9)])
    assert check.status == "fail"
    assert str(tmp_path) in check.detail
    assert "data-root" in check.fix


def test_disk_with_room_passes(tmp_path):
    assert check_disk([("checkpoints", tmp_path, 0.001)]).status == "ok"


def test_disk_needs_on_one_filesystem_add_up(tmp_path):
    stats = os.statvfs(tmp_path)
    free_gb = stats.f_bavail * stats.f_frsize / 1e9
    # Each fits alone; together they do not.
    check = check_disk([("HF cache", tmp_path / "cache", free_gb * 0.6), ("outputs", tmp_path / "outputs", free_gb * 0.6)])
    assert check.status == "fail"
    assert "HF cache" in check.detail and "outputs" in check.detail


def test_folder_not_yet_created_is_judged_by_its_parent(tmp_path):
    assert check_disk([("outputs", tmp_path / "not" / "yet", 0.001)]).status == "ok"


@pytest.fixture
def no_secret_files(tmp_path, monkeypatch):
    """No /run/secrets, no token variables: only what a test sets."""
    monkeypatch.setenv("MEDCOT_SECRETS_DIR", str(tmp_path / "no-secrets"))
    for name in ("HF_TOKEN", "WANDB_API_KEY", "HF_TOKEN_PATH", "WANDB_API_KEY_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_tokens_from_environment_and_empty_wandb_in_dotenv_pass(no_secret_files, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_doctortestvalue123")
    dotenv = no_secret_files / ".env"
    dotenv.write_text("WANDB_API_KEY=\n")
    hf, wandb = check_tokens(dotenv)
    assert (hf.status, wandb.status) == ("ok", "ok")
    assert "offline" in wandb.detail


def test_missing_tokens_fail_with_where_to_put_them(no_secret_files):
    dotenv = no_secret_files / ".env"
    hf, wandb = check_tokens(dotenv)
    assert hf.status == "fail" and "huggingface.co/settings/tokens" in hf.fix and str(dotenv) in hf.fix
    # Optional for the jobs, but compose will not start while the variable is undefined.
    assert wandb.status == "fail" and "`WANDB_API_KEY=`" in wandb.fix


def test_hf_token_only_in_a_file_fails_because_compose_cannot_see_it(no_secret_files, monkeypatch):
    token_file = no_secret_files / "hf_token"
    token_file.write_text("hf_doctortestvalue123\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(token_file))
    hf, _ = check_tokens(no_secret_files / ".env")
    assert hf.status == "fail" and "only in a file" in hf.detail


def test_token_values_never_appear_in_the_report(no_secret_files):
    dotenv = no_secret_files / ".env"
    dotenv.write_text("HF_TOKEN=hf_doctortestvalue123\nWANDB_API_KEY=wandbdoctortestvalue456\n")
    checks = check_tokens(dotenv)
    assert [c.status for c in checks] == ["ok", "ok"]
    text = " ".join(c.detail + c.fix for c in checks)
    assert "doctortestvalue" not in text


def test_docker_missing_or_unreachable_fails_with_its_fix():
    assert "docs.docker.com/engine/install" in check_docker(None, None).fix
    denied = check_docker("2.40.3", "permission denied while trying to connect to the Docker daemon socket at "
                                    "unix:///var/run/docker.sock")
    assert denied.status == "fail" and "usermod -aG docker" in denied.fix


def test_compose_older_than_env_secrets_support_fails():
    assert check_docker("2.17.3", "").status == "fail"
    assert check_docker("v2.40.3\n", "").status == "ok"


def test_container_toolkit_found_by_docker_runtime_or_program():
    assert check_container_toolkit([], RUNTIMES_WITH_NVIDIA).status == "ok"
    assert check_container_toolkit(["nvidia-ctk"], RUNTIMES_PLAIN).status == "ok"


def test_container_toolkit_missing_fails_with_install_commands():
    check = check_container_toolkit([], RUNTIMES_PLAIN)
    assert check.status == "fail"
    assert "nvidia-ctk runtime configure --runtime=docker" in check.fix


def test_machine_without_nvidia_or_docker_fails_each_with_its_fix(recipe, no_secret_files, monkeypatch):
    empty_bin = no_secret_files / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    checks = {c.name: c for c in run_checks(recipe, DEFAULT_IMAGE_CUDA, no_secret_files / ".env", "medcot:latest",
                                            hf_cache=no_secret_files, outputs=no_secret_files)}
    assert checks["NVIDIA driver"].status == "fail" and "install the NVIDIA driver" in checks["NVIDIA driver"].fix
    assert checks["Docker + Compose"].status == "fail"
    assert checks["NVIDIA Container Toolkit"].status == "fail"
    assert checks["GPU memory"].status == "skip"
    assert checks["Triton in the image"].status == "skip"
