"""Compiled kernels kept between jobs: one folder per GPU model and software version."""

from pathlib import Path

from medcot.compilecache import VARIABLES, cache_key, cache_root, installed_versions, use_compile_cache

H100 = ("NVIDIA H100 80GB HBM3", (9, 0), "13.0")


def test_each_tool_gets_a_folder_under_medcot_cache_named_for_the_gpu_and_versions(tmp_path):
    env = {"MEDCOT_CACHE": str(tmp_path / "cache")}
    folder = use_compile_cache(*H100, env=env)

    assert folder.parent == tmp_path / "cache" / "compile"
    assert folder.name.startswith("NVIDIA_H100_80GB_HBM3-sm90-cuda13.0-torch" + installed_versions()["torch"])
    assert {env[v] for v in VARIABLES} == {str(folder / "inductor"), str(folder / "triton"), str(folder / "unsloth")}
    assert all(Path(env[v]).is_dir() for v in VARIABLES)
    assert env["TORCHINDUCTOR_FX_GRAPH_CACHE"] == env["TORCHINDUCTOR_AUTOGRAD_CACHE"] == "1"


def test_another_gpu_or_version_never_shares_a_folder():
    versions = {"torch": "2.11.0", "triton": "3.7.1", "transformers": "5.0.0", "unsloth": None}
    h100 = cache_key(*H100, versions)
    assert cache_key("NVIDIA H200", (9, 0), "13.0", versions) != h100
    assert cache_key("NVIDIA H100 80GB HBM3", (9, 0), "12.8", versions) != h100
    assert cache_key(*H100, {**versions, "triton": "3.7.0"}) != h100
    assert cache_key(*H100, {**versions, "unsloth": "2026.1"}) != h100
    assert cache_key(*H100, versions) == h100
    assert "/" not in cache_key("a/b c", (8, 6), None, versions)


def test_a_folder_the_user_chose_is_kept(tmp_path):
    env = {"MEDCOT_COMPILE_CACHE": str(tmp_path / "mine"), "TRITON_CACHE_DIR": "/fast/triton"}
    folder = use_compile_cache(*H100, env=env)
    assert env["TRITON_CACHE_DIR"] == "/fast/triton"
    assert folder.parent == tmp_path / "mine" == cache_root(env)
