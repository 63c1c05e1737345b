"""The GPU benchmark's own arithmetic, verdicts and report (BENCHMARKS.md), checked on CPU against the committed
results."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))  # bench/ is a package of the repository, not an installed one

from bench.common import merge_results  # noqa: E402
from bench.model import R1_DISTILL_LLAMA_8B, frozen_matmul_params, train_flops_per_token  # noqa: E402
from bench.reference import _parse_ref_variant, profile_text  # noqa: E402
from bench.render import (  # noqa: E402
    Part,
    Row,
    demo_verdicts,
    export_verdicts,
    load_parts,
    loss_agreement,
    reference_rows,
    render,
    render_demo,
    write_benchmarks_md,
)


def test_frozen_matmul_weights_are_llama_8b_without_embeddings_and_norms():
    # Llama-3.1-8B has 8,030,261,248 parameters: minus the input embedding (128256 x 4096) and the 65 RMSNorm
    # weight vectors, what is left is the weights of the matrix products that every token goes through.
    assert frozen_matmul_params(R1_DISTILL_LLAMA_8B) == 8_030_261_248 - 128256 * 4096 - 65 * 4096


def test_train_flops_count_four_per_frozen_weight_six_per_lora_weight_plus_attention():
    arch = R1_DISTILL_LLAMA_8B
    lora = 41_943_040  # r 16 on the 7 projections of 32 layers, as the train job reports
    per_token = train_flops_per_token(arch, 2048, lora)
    assert per_token == 4 * frozen_matmul_params(arch) + 6 * lora + 6 * 32 * 2048 * 4096


@pytest.mark.parametrize(("variant", "expected"), [
    ("2x4:unsloth", (2, 4, "unsloth", {})),
    ("8x1:true:padded", (8, 1, True, {"padding_free": False})),
    ("2x4:false:padding_free:rebalance", (2, 4, False, {"padding_free": True, "sampling": "batch_rebalance"})),
    ("8x1:auto:grouped", (8, 1, "auto", {"sampling": "group_by_length"})),
    ("8x1:auto:cold:profile", (8, 1, "auto", {})),
])
def test_reference_variants_map_to_config_keys(variant, expected):
    assert _parse_ref_variant(variant) == expected


def parts(*names: str) -> list[Part]:
    return load_parts(RESULTS / name for name in names)


def section(page: str, heading: str) -> str:
    """One `## ` section of a rendered page, its `### ` subsections included."""
    return page.partition(f"\n## {heading}\n")[2].partition("\n## ")[0]


CURRENT = sorted(RESULTS.glob("*.json"))
# The H100 machines of 2026-11-26, the only measurements of the transformers path and of 8x2048.
H100 = ("history/2026-11-26-h100-80gb-hbm3-default.json", "history/2026-11-26-h100-80gb-hbm3-levers.json",
        "history/2026-11-26-h100-80gb-hbm3-reference.json")


def test_benchmarks_md_is_the_rendering_of_the_committed_results_above_its_notes():
    page = render(load_parts(CURRENT))
    assert (ROOT / "BENCHMARKS.md").read_text().startswith(page + "\n## Notes\n")


def test_every_committed_results_file_feeds_a_table_and_superseded_ones_are_in_history(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# old tables\n\n## Notes\n\nhand-written\n")
    assert write_benchmarks_md(md, load_parts(CURRENT)) == []
    assert md.read_text().endswith("\n## Notes\n\nhand-written\n") and "# old tables" not in md.read_text()
    # The chain of 2026-12-02 is superseded by the one of 2026-12-03: nothing of its file is shown.
    superseded = write_benchmarks_md(md, load_parts([*CURRENT, RESULTS / "history" / "2026-12-02-h200-chain-d.json"]))
    assert superseded == ["bench/results/history/2026-12-02-h200-chain-d.json"]


def test_results_are_read_by_date_whatever_the_order_given():
    parts = load_parts(reversed(CURRENT))
    names = [p.name for p in parts]
    assert names == sorted(names) == [p.name for p in load_parts(CURRENT)]
    assert [p.date for p in parts] == sorted(p.date for p in parts) and names[0].startswith("bench/results/2026-12-01")


def test_the_page_opens_with_each_topics_current_figure_and_its_date():
    page = render(load_parts(CURRENT))
    top = page.partition("\n## ")[0]
    assert "| [The chain](#the-chain) | 179.5 s for the five jobs on a new machine | 2026-12-03 |" in top
    assert ("| [The reference train job](#the-reference-train-job) | 66.1 s with the compile cache of an earlier job, "
            "81.9 s with an empty compile cache | 2026-12-03 |") in top
    assert "| [Decoding at batch 101](#decoding-at-batch-101) | 10,276 generated tokens/s" in top
    assert "| [Training throughput](#training-throughput) | 13,905 tokens/s at 2x2048 without checkpointing;" in top
    assert "| [The CPU demo](#the-cpu-demo) | `make demo` 282.8 s, `make setup` 102.8 s" in top


def test_each_table_names_its_date_machine_versions_and_results_file():
    page = render(load_parts(CURRENT))
    machine = ("NVIDIA H200 (143771 MiB, driver 580.159.04): torch 2.11.0, transformers 5.17.0, trl 1.14.0, peft 0.21.0, "
               "bitsandbytes 0.50.2, unsloth 2026.10.9 (zoo 2026.10.9), triton 3.6.0, Python 3.12.3.")
    assert f"- Measured 2026-12-03 on {machine} Results: `bench/results/2026-12-03-h200-chain.json`." in section(page, "The chain")
    assert f"- Measured 2026-12-01 on {machine} Results: `bench/results/2026-12-01-h200-train.json`, " in section(
        page, "Training throughput")
    # Rows of different days: the table says which is which.
    reference = section(page, "The reference train job")
    assert f"- Measured 2026-12-02 and 2026-12-03 on {machine}" in reference and " | date |" in reference
    # The packages that differed from the image's lock, the same for every file: said once, at the top.
    assert page.count("numpy 2.5.2 (lock 2.5.5)") == 1


def test_each_table_gives_the_command_that_measures_it_again():
    page = render(load_parts(CURRENT))
    assert ("`python3 bench/run.py --sections peak,build,train --train-runs unsloth:false:padded@2x2048,"
            "unsloth:unsloth:padded@2x2048`") in section(page, "Training throughput")
    # Runs on an empty cache of their own first, then the one that finds the shared cache empty, then the rest.
    assert ("`python3 bench/run.py --sections build,reference --reference 8x1:auto:cold,8x1:auto:alltrainers,8x1:auto,"
            "8x1:auto:nofreeze,8x1:auto:padded`") in section(page, "The reference train job")
    assert "`python3 bench/demo.py --clean-clone`" in section(page, "The CPU demo")


def test_the_latest_chain_is_judged_and_a_chain_with_overrides_is_shown_apart():
    chain = section(render(load_parts(CURRENT)), "The chain")
    assert "| **whole chain** | **179.5 s** |" in chain and "| whole chain <= 300 s, downloads excluded | 179.5 s | **pass** |" in chain
    assert "| a second evaluate job compiles in <= 5 s | 2.0 s (without the cache: —) | **pass** |" in chain
    apart = chain.partition("### The chain with `eval.decode_compile=false` (not judged)")[2]
    assert "| **whole chain** | **214.0 s** |" in apart and "verdict" not in apart
    assert "bfloat16 weights, decoder layer not compiled: 121,200 tokens in 18.6 s = 6,531 tokens/s" in apart


def test_the_reference_table_holds_the_recipes_layout_as_shipped_then_with_one_speed_up_off():
    reference = section(render(load_parts(CURRENT)), "The reference train job")
    rows = [line for line in reference.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[:2] for row in rows[:5]] == [
        ["| as shipped", "an earlier job's (314 files)"], ["| as shipped", "empty"],
        ["| every TRL trainer rewritten (`MEDCOT_UNSLOTH_SFT_ONLY=0`)", "empty"],
        ["| imports' heap not frozen (`MEDCOT_GC_FREEZE=0`)", "an earlier job's (332 files)"],
        ["| padded batches (`training.padding_free: false`)", "an earlier job's"]]
    assert ("| as shipped | an earlier job's (314 files) | auto: none | 66.1 s | 13.7 s | 7.2 s | 2.5 s (0.60 s) | 42.2 s "
            "| 10,858 | 46.1 GiB | 11.6253 | 0.0 s (0 frames) | 2026-12-03 |") in rows
    # The notebook's 2 x 4 layout, the recipe's until 2026-12-02, is history: in the results, not in the table.
    assert "132.2 s" not in reference and "139.8 s" not in reference and "2x4" not in reference
    assert "| the train job, the recipe as shipped, <= 90 s, the compile cache of an earlier job | 66.1 s | **pass** |" in reference
    assert "| the train job, the recipe as shipped, <= 90 s, an empty compile cache | 81.9 s | **pass** |" in reference


def test_a_later_measurement_of_the_same_run_replaces_the_earlier_one():
    earlier = [p for p in CURRENT if "sft-trainer-only" not in p.name]
    # The recipe as shipped on an empty cache: 92.7 s (2026-12-02, padding_free set as it resolves), then 86.7 s
    # (2026-12-03, the chain's machine), then 81.9 s (2026-12-03, the next machine).
    assert "| as shipped | empty | auto: none | 86.7 s |" in section(render(load_parts(earlier)), "The reference train job")
    reference = section(render(load_parts(CURRENT)), "The reference train job")
    assert "| as shipped | empty | auto: none | 81.9 s |" in reference and "86.7 s" not in reference and "92.7 s" not in reference


def test_loss_curves_compare_only_runs_that_see_the_same_rows():
    reference = section(render(load_parts(CURRENT)), "The reference train job")
    assert ("the largest per-step difference from the first row's over 60 steps: 0.0027 (as shipped, empty); "
            "0.0024 (every TRL trainer rewritten") in reference
    rows = [Row(key, entry, part) for part in parts("history/2026-11-25-h100-80gb-hbm3-reference.json",
                                                   "history/2026-11-25-h100-80gb-hbm3-reference-eval.json")
            for key, entry in part.data["reference"].items()]
    line = loss_agreement(rows)
    assert "over 60 steps: 0.0020 (padded batches (`training.padding_free: false`), checkpointing unsloth (offloaded), —)." in line
    assert "rebalance" not in line


def test_a_profiled_reference_run_is_never_shown_nor_judged(tmp_path):
    import cProfile

    def slow_step():
        return sum(i * i for i in range(200_000))

    prof = tmp_path / "job.prof"
    cProfile.runctx("slow_step()", globals(), {"slow_step": slow_step}, str(prof))
    text = profile_text(prof)
    assert "slow_step" in text and "cumulative" in text and "tottime" in text

    current = load_parts(CURRENT)
    fast = next(r.entry for r in reference_rows(current) if r.entry["wall_s"] == 66.1)
    # A profiled run that looked fast (it cannot: the profiler slows it) must not replace the measurement.
    profiled = Part("2026-12-04-h200-profile.json", {"meta": {"date": "2026-12-04"}, "reference": {
        "8x1:auto:profile": {**fast, "variant": "8x1:auto:profile", "wall_s": 50.0, "profile": text}}})
    assert [r.entry["wall_s"] for r in reference_rows([*current, profiled])][:2] == [66.1, 81.9]


def test_decoding_is_judged_on_the_warm_generate_call_and_the_whole_call_shown_apart():
    decoding = section(render(load_parts(CURRENT)), "Decoding at batch 101")
    targets, _, stricter = decoding.partition("### Stricter: the whole generate call, its compile included")
    assert "| empty cache, graph:triton | graph: triton | 6.8 s | 3.9 s / 0.2 s | 9.4 ms | 10,745 | 10,276 | 2026-12-03 |" in targets
    assert ("the generate call after a warm-up of the same shapes (batch 101) | 10,276 (empty cache, graph:triton) "
            "| **pass** |") in targets
    assert "steady decoding (the chain) | 11,099 (eval-before, batch 101), 11,477 (eval-after, batch 101) | **pass** |" in targets
    assert "whole generate call" not in targets.partition("### Targets")[2]
    assert "early ends), the compile cache of an earlier job | 8,671 (eval-after, batch 101) | **pass** |" in stricter
    assert "early ends), an empty compile cache | 6,786 (eval-before, batch 101) | **miss** |" in stricter


def test_only_the_graph_decoders_compiled_triton_step_is_judged():
    current = load_parts(CURRENT)
    graph = {"decoder": "graph", "decode_attention": "triton", "step_s": 0.0097}
    later = Part("2026-12-04-h200-decode.json", {"meta": {"date": "2026-12-04"}, "decode": {
        "empty cache, graph:triton": {"full": {**graph, "compiled": True}, "warm": {"tokens_per_s": 7950.4}},
        "empty cache, graph:triton, layer not compiled": {"full": {**graph, "compiled": False},
                                                          "warm": {"tokens_per_s": 8412.0}},
        "empty cache, graph:efficient": {"full": {**graph, "decode_attention": "efficient"},
                                         "warm": {"tokens_per_s": 9000.0}}}})
    decoding = section(render([*current, later]), "Decoding at batch 101")
    assert "(batch 101) | 7,950 (empty cache, graph:triton) | **miss** |" in decoding
    assert "| empty cache, graph:triton, layer not compiled | graph: triton | — | — / — | 9.7 ms | 10,412 | 8,412 | 2026-12-04 |" in decoding


def test_training_targets_on_the_h100_results_that_measured_the_transformers_path():
    training = section(render(parts(*H100)), "Training throughput")
    # The fastest Unsloth run at 2x2048 within the 8 GiB target; the ratio to transformers both with checkpointing.
    assert "| train, Unsloth 2x2048 >= 9,500 tokens/s | 9,651 (unsloth:true:padded) | **pass** |" in training
    assert "| train, Unsloth >= 3.5x transformers at 2x2048 | 2.07x | **miss** |" in training
    assert "62.4% (unsloth:false:padded)" in training and "| train, 8x2048 >= 50% MFU |" in training


def test_the_current_training_table_leaves_unmeasured_targets_open():
    training = section(render(load_parts(CURRENT)), "Training throughput")
    assert "| unsloth, padded batches | none | 2x2048 | 4 | 13,905 | 20.8 GiB | 57.9% | 8.3 s |" in training
    assert "| train, Unsloth >= 3.5x transformers at 2x2048 | — | — |" in training
    assert "—: no current measurement (the history below has the last one)." in training


def test_generation_targets_count_the_evaluate_jobs_answer_length_not_a_shorter_run():
    generation = section(render(parts("history/2026-11-25-h100-80gb-hbm3-reference-eval.json",
                                      "history/2026-11-25-h100-80gb-hbm3-eval.json")), "Generation at batch 1, 8 and 32")
    # 2,110 tokens/s was for 256-token answers; the verdict counts the evaluate job's 1,200-token answers.
    assert ("| eval, batch 32 >= 2,000 tokens/s | 1,196 (transformers-16bit-static, 1200 new tokens), 2,110 "
            "(transformers-16bit-static, 256 new tokens) | **miss** |") in generation
    current = section(render(load_parts(CURRENT)), "Generation at batch 1, 8 and 32")
    assert "| eval, best >= 3x transformers 4-bit at each batch | 15.2x (batch 1), 20.4x (batch 8), 14.1x (batch 32) | **pass** |" in current


def test_merging_two_runs_of_a_day_keeps_a_variant_measured_on_a_cache_in_another_state():
    first = {"reference": {"8x1:auto": {"wall_s": 68.9, "compile_cache": "shared"}, "2x4:auto": {"wall_s": 132.2}}}
    second = {"reference": {"8x1:auto": {"wall_s": 92.5, "compile_cache": "empty"}, "2x4:auto": {"wall_s": 139.8}}}
    merged = merge_results([first, second])["reference"]
    assert merged["8x1:auto"]["wall_s"] == 92.5 and merged["8x1:auto (shared cache)"]["wall_s"] == 68.9
    assert merged["2x4:auto"]["wall_s"] == 139.8 and len(merged) == 3  # without a cache state: the later replaces


def test_a_merged_file_keeps_its_chain_with_overrides_apart_from_the_recipes():
    recipe = {"chain": {"overrides": [], "wall_s": 200.6, "stages": {"train": {"wall_s": 83.1}}}}
    other = {"chain": {"overrides": ["eval.decode_compile=false"], "wall_s": 214.0, "stages": {"train": {"wall_s": 92.8}}}}
    merged = merge_results([recipe, other])
    assert merged["chain"]["wall_s"] == 200.6
    assert merged["chain_variants"] == {"eval.decode_compile=false": other["chain"]}
    chain = section(render([Part("2026-12-04-h200.json", {**merged, "meta": {"date": "2026-12-04"}})]), "The chain")
    assert "| **whole chain** | **200.6 s** |" in chain and "| whole chain <= 300 s, downloads excluded | 200.6 s |" in chain
    assert "### The chain with `eval.decode_compile=false` (not judged)" in chain and "| **whole chain** | **214.0 s** |" in chain


def test_committed_cpu_demo_results_are_benchmarks_mds_demo_section_and_show_a_significant_gain():
    """Every committed demo run is on the page, and its report passed the paired tests; its time is a verdict on the
    page (a 2-core CPU without AMX misses 300 s), not a test."""
    page = (ROOT / "BENCHMARKS.md").read_text()
    paths = sorted(RESULTS.glob("*-cpu-demo-*.json"))
    assert paths
    for path in paths:
        result = json.loads(path.read_text())
        assert render_demo(result, f"bench/results/{path.name}") in page
        checked = {name: ok for name, _, ok in demo_verdicts(result)}
        assert len(checked) == 6, checked
        assert all(ok for name, ok in checked.items() if "<= 300 s" not in name), checked


def _demo(date: str, machine: str, dtype: str, jobs_s: float) -> Part:
    return Part(f"bench/results/{date}-cpu-demo.json", {"date": date, "machine": machine, "dtype": dtype, "commit": "abc",
                                                        "torch": "2.13.0+cpu", "jobs": [], "jobs_s": jobs_s})


def test_the_demo_section_shows_the_latest_run_on_each_kind_of_cpu():
    amx, avx2 = "bf16 weights and autocast (AMX / AVX-512 BF16)", "fp32 (no native bf16)"
    parts = [_demo("2026-12-01", "Intel, 2 cores", amx, 290.0), _demo("2026-12-02", "AMD, 2 cores", avx2, 410.0),
             _demo("2026-12-03", "Intel, 2 cores", amx, 250.0)]
    demo = section(render(parts), "The CPU demo")
    assert "### Intel, 2 cores, bf16 weights and autocast" in demo and "### AMD, 2 cores, fp32" in demo
    assert "| **the demo's jobs** | **250.0 s** |" in demo and "| **the demo's jobs** | **410.0 s** |" in demo
    assert "290.0" not in demo  # replaced by the later run on the same kind of CPU
    assert "| the demo's jobs <= 300 s | 410.0 s | **miss** |" in demo


def test_the_8b_export_is_judged_on_its_q8_0_time_and_its_peak_memory_against_the_16_bit_weights():
    committed = json.loads((RESULTS / "2026-12-03-h200-export-8b.json").read_text())
    assert [ok for _, _, ok in export_verdicts(committed)] == [True, True]
    slow = {**committed, "runs": [{**r, "process_s": 181.0, "peak_rss": committed["weights_bytes"] + 2.1e9}
                                  for r in committed["runs"]]}
    verdicts = export_verdicts(slow)
    assert [ok for _, _, ok in verdicts] == [False, False]
    assert verdicts[0][:2] == ("8B to q8_0 in <= 180 s on the GPU machine's CPUs", "181.0 s (16 threads)")
    page = render(load_parts([RESULTS / "2026-12-03-h200-export-8b.json"]))
    assert "| q8_0 | 16 | 51.4 s | 56.1 s | 8.54 GB | 5.85 GB |" in section(page, "Export to GGUF")


def test_lock_environment_holds_the_locks_packages_and_not_the_machines_others(tmp_path):
    """bench/lockenv.py, as the GPU runs use it: from this environment, with no wheels. A package the lock lacks
    (scikit-learn, which transformers imports whenever it is installed) stays out; a namespace folder that two
    distributions share keeps both (google/: protobuf, which wandb imports)."""
    import subprocess

    from bench.lockenv import link_files

    if subprocess.run([sys.executable, "-c", "import sklearn, google.protobuf"]).returncode != 0:
        pytest.skip("this environment lacks scikit-learn or protobuf")
    env = tmp_path / "env"
    subprocess.run([sys.executable, str(ROOT / "bench" / "lockenv.py"), str(env)], check=True, capture_output=True)
    python = str(env / "bin" / "python")
    assert subprocess.run([python, "-c", "import google.protobuf, transformers, peft, trl"], cwd=ROOT).returncode == 0
    probe = subprocess.run([python, "-c", "import sklearn"], capture_output=True, text=True, cwd=ROOT)
    assert probe.returncode != 0 and "No module named 'sklearn'" in probe.stderr

    # A real google/ folder already there (a wheel's): the machine's google/protobuf goes inside it.
    source, site = tmp_path / "machine", tmp_path / "site"
    (source / "google" / "protobuf").mkdir(parents=True)
    (source / "google" / "protobuf" / "__init__.py").write_text("")
    (site / "google" / "other").mkdir(parents=True)
    linked = link_files(source, site, [("google", "protobuf", "__init__.py"), ("..", "bin", "x")])
    assert linked == [source / "google" / "protobuf"] and (site / "google" / "protobuf" / "__init__.py").is_file()
