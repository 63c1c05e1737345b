"""medcot.decoding: medcot's greedy decoder gives transformers' `generate` tokens, compiles one decoder layer for all
of them, and (on a GPU) replays the step from a CUDA graph; medcot.kernels' attention equals SDPA's over each row's
valid cache positions, on CPU under Triton's interpreter and on a GPU compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from medcot.config import load_config
from medcot.decoding import IMPLEMENTATION, GraphDecoder
from medcot.generation import choose_decoder, generate
from medcot.rundir import StageError

from conftest import ROOT

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `pytest -m gpu`)")


def small_llama(layers: int = 3, head_dim: int = 16, dtype=torch.float32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=8 * head_dim, intermediate_size=256, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512)
    return LlamaForCausalLM(config).to(dtype).eval()


def left_padded(rows: int = 4, width: int = 12, seed: int = 1, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Row i has 2i pad tokens (id 0) on the left."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    for i in range(rows):
        mask[i, :2 * i] = 0
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def transformers_greedy(model, ids, mask, new: int, eos: list[int], min_new: int = 0) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=min_new or None,
                              do_sample=False, pad_token_id=0, eos_token_id=eos)


def graph_greedy(model, ids, mask, new: int, eos: list[int], min_new: int = 0, **options) -> torch.Tensor:
    decoder = GraphDecoder(model, batch=ids.shape[0], cache_len=ids.shape[1] + new, eos_ids=eos, pad_id=0, **options)
    try:
        return decoder.run(ids, mask, max_new_tokens=new, min_new_tokens=min_new)
    finally:
        decoder.close()


@pytest.mark.parametrize("kernel", ["sdpa", "matmul"])
def test_tokens_equal_transformers_generate_with_left_padding_and_early_ends(kernel):
    model = small_llama()
    ids, mask = left_padded()
    free = transformers_greedy(model, ids, mask, 40, eos=[299])  # a token this model does not pick here
    assert free.shape == (4, 52)
    # An end token that row 0 picks at its 6th step: row 0 then stops there, the others go on.
    eos = [int(free[0, 12 + 5])]
    assert eos[0] not in free[0, 12:17].tolist()
    theirs = transformers_greedy(model, ids, mask, 40, eos=eos)
    ours = graph_greedy(model, ids, mask, 40, eos=eos, kernel=kernel)
    assert ours.shape == (4, 52)
    assert torch.equal(ours[:, :theirs.shape[1]], theirs), (ours, theirs)
    assert (ours[0, 18:] == 0).all()  # pad after the end, as generate writes it
    assert ours[1:, 12:].ne(0).any(dim=1).all()


def test_rows_that_have_ended_attend_only_the_current_position_and_the_others_are_unchanged(monkeypatch):
    import medcot.decoding as decoding

    model = small_llama()
    ids, mask = left_padded()
    free = transformers_greedy(model, ids, mask, 30, eos=[299])
    eos = [int(free[0, 12 + 5])]  # row 0 ends at its 6th new token
    calls = []
    real = decoding.gqa_decode

    def recording(query, key, value, slot, start, scale, kernel):
        calls.append((int(slot), start.tolist()))
        return real(query, key, value, slot, start, scale, kernel)

    theirs = transformers_greedy(model, ids, mask, 30, eos=eos)
    monkeypatch.setattr(decoding, "gqa_decode", recording)
    ours = graph_greedy(model, ids, mask, 30, eos=eos, kernel="matmul")
    assert torch.equal(ours[:, :theirs.shape[1]], theirs)
    layers = model.config.num_hidden_layers
    steps = [calls[i] for i in range(0, len(calls), layers)]  # the first layer's call of each decoding step
    assert len(steps) == 29
    # Before row 0's end: every row from its first real position (row i has 2i pads). From the step after it:
    # row 0 from the current slot only, the others as before.
    assert steps[0] == (12, [0, 2, 4, 6])
    assert steps[4] == (16, [0, 2, 4, 6])
    assert all(start == [slot, 2, 4, 6] for slot, start in steps[5:])


def test_min_new_tokens_keeps_the_end_token_out_as_generate_does():
    model = small_llama()
    ids, mask = left_padded()
    eos = [int(transformers_greedy(model, ids, mask, 8, eos=[299])[0, 12 + 2])]
    theirs = transformers_greedy(model, ids, mask, 20, eos=eos, min_new=10)
    ours = graph_greedy(model, ids, mask, 20, eos=eos, min_new=10)
    assert torch.equal(ours[:, :theirs.shape[1]], theirs)
    assert eos[0] not in ours[:, 12:22].tolist()[0]


def test_one_graph_is_compiled_for_all_layers_and_decodes_the_same_tokens():
    model = small_llama(layers=4)
    ids, mask = left_padded()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    theirs = transformers_greedy(model, ids, mask, 24, eos=[299])
    ours = graph_greedy(model, ids, mask, 24, eos=[299], compile=True, compile_backend=counting_backend)
    assert torch.equal(ours, theirs)
    assert len(graphs) == 1, [g.code for g in graphs]  # Dynamo traced one layer; the other three reused it
    ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert "medcot.gqa_decode.default" in ops, ops  # the attention is the opaque op, inside the layer's graph


def test_the_decoder_gives_back_its_buffers_and_the_models_attention():
    model = small_llama()
    before = model.config._attn_implementation
    ids, mask = left_padded()
    decoder = GraphDecoder(model, batch=4, cache_len=40, eos_ids=[299], pad_id=0)
    assert model.config._attn_implementation == IMPLEMENTATION
    assert model.model.layers[0].self_attn.medcot_k.shape == (4, 2, 40, 16)
    with pytest.raises(ValueError, match="does not fit"):
        decoder.run(ids, mask, max_new_tokens=30)  # 12 + 30 > 40 positions
    decoder.close()
    assert model.config._attn_implementation == before
    assert not any("medcot" in name for name, _ in model.named_buffers())


def test_one_decoder_serves_batches_of_different_prompt_widths():
    model = small_llama()
    wide, wide_mask = left_padded(width=12, seed=1)
    narrow, narrow_mask = left_padded(width=7, seed=2)
    decoder = GraphDecoder(model, batch=4, cache_len=12 + 16, eos_ids=[299], pad_id=0)
    try:
        first = decoder.run(wide, wide_mask, max_new_tokens=16)
        second = decoder.run(narrow, narrow_mask, max_new_tokens=16)  # the wide batch's keys are still in the cache
    finally:
        decoder.close()
    assert torch.equal(first, transformers_greedy(model, wide, wide_mask, 16, eos=[299]))
    assert torch.equal(second, transformers_greedy(model, narrow, narrow_mask, 16, eos=[299]))


def test_evaluate_generate_with_the_graph_decoder_writes_what_transformers_writes(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = ["What causes anemia?", "Define hypertension in adults, briefly.", "Why?", "List three causes of fever.",
               "What is sepsis?"]
    results = {}
    for decoder in ("transformers", "graph"):
        stats: dict = {}
        rows, _ = generate(model, tokenizer, prompts, max_new_tokens=20, batch_size=2, stats=stats, decoder=decoder)
        results[decoder] = (rows, stats)
    assert results["graph"][0] == results["transformers"][0]
    stats = results["graph"][1]
    assert stats["decoder"] == "graph" and stats["decode_attention"] == "sdpa" and stats["compile_s"] is None
    assert results["transformers"][1]["decoder"] == "transformers"
    assert model.config._attn_implementation == "sdpa"


def test_auto_decoder_is_transformers_on_a_cpu_and_graph_refuses_what_it_cannot_do():
    model = small_llama()
    assert choose_decoder("auto", model, do_sample=False) == ("transformers", "auto: not on a GPU")
    assert choose_decoder("graph", model, do_sample=False)[0] == "graph"
    with pytest.raises(StageError, match="greedily"):
        choose_decoder("graph", model, do_sample=True)
    with pytest.raises(ValueError, match="eval.decoder graph decodes greedily"):
        load_config(None, ["eval.decoder=graph", "eval.do_sample=true"])


def test_graph_decoder_refuses_other_architectures_with_the_setting_to_change():
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(StageError, match="model_type 'mistral'.*eval.decoder auto or transformers"):
        choose_decoder("graph", model, do_sample=False)
    assert choose_decoder("auto", model, do_sample=False)[0] == "transformers"


KERNEL_CHECK = textwrap.dedent("""
    import json, sys, torch
    from medcot.kernels import gqa_decode
    device = sys.argv[1]
    worst = {"float32": 0.0, "bfloat16": 0.0}
    g = torch.Generator().manual_seed(0)
    # (batch, kv heads, groups, head dim, positions, slot, starts)
    cases = [(3, 2, 4, 16, 600, 530, [0, 7, 300]),   # a row that starts in the second chunk
             (2, 2, 1, 32, 300, 255, [0, 200]),      # the slot on a chunk's last position; one query head per KV head
             (2, 1, 8, 16, 520, 256, [256, 3]),      # the slot on a chunk's first position, a row starting there
             (1, 2, 4, 64, 70, 0, [0])]              # the first step: one position
    for b, h, grp, d, n, slot, starts in cases:
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v = (torch.randn(b, h, s, d, generator=g).to(dtype).to(device) for s in (grp, n, n))
            k = k.transpose(1, 2).contiguous().transpose(1, 2)  # strided heads, as a view of another layout
            slot_t = torch.tensor([slot], device=device)
            start = torch.tensor(starts, device=device)
            out = gqa_decode(q, k, v, slot_t, start, 0.3)
            pos = torch.arange(n, device=device)
            mask = (pos[None] >= start[:, None]) & (pos[None] <= slot_t)
            ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                   attn_mask=mask[:, None, None], scale=0.3)
            assert out.dtype == dtype and out.shape == q.shape
            name = str(dtype).split(".")[1]
            worst[name] = max(worst[name], (out.float() - ref).abs().max().item())
    print(json.dumps(worst))
""")


def run_kernel_check(device: str, interpret: bool) -> dict[str, float]:
    """The largest difference from fp32 SDPA over the cases above, per input dtype."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", KERNEL_CHECK, device], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="Triton is installed on Linux (the dev extra)")
def test_triton_kernel_equals_sdpa_over_each_rows_valid_positions_in_the_interpreter():
    worst = run_kernel_check("cpu", interpret=True)
    assert worst["float32"] < 1e-5 and worst["bfloat16"] < 1e-2, worst  # bf16: the output's own rounding


# ---- on a GPU: the kernel compiled, and the decoder compiled and replayed from a CUDA graph -------------

@pytest.mark.gpu
@needs_gpu
def test_triton_kernel_equals_sdpa_on_the_gpu():
    worst = run_kernel_check("cuda", interpret=False)
    assert worst["float32"] < 1e-2 and worst["bfloat16"] < 1e-2, worst  # fp32 inputs: TF32 products on the GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("kernel,compiled", [("triton", True), ("efficient", True), ("triton", False)])
def test_graph_decoder_picks_argmax_tokens_on_the_gpu(kernel, compiled):
    """bf16 on a GPU: each token is the argmax of a plain forward over the sequence (no cache, not compiled), up to
    bf16 rounding; the step, its layer compiled or not (eval.decode_compile), is captured once and replayed for a
    second batch."""
    torch._dynamo.reset()
    model = small_llama(layers=4, head_dim=64, dtype=torch.bfloat16).cuda()
    ids, mask = left_padded(rows=5, width=20, device="cuda")
    decoder = GraphDecoder(model, batch=5, cache_len=20 + 48, eos_ids=[299], pad_id=0, kernel=kernel, compile=compiled)
    try:
        assert decoder.kernel == kernel and decoder.compile == compiled and decoder.graph_enabled
        assert all(hasattr(layer, "_orig_mod") == compiled for layer in decoder.layers)
        out = decoder.run(ids, mask, max_new_tokens=48)
        graph = decoder.cuda_graph
        assert graph is not None and decoder.eager_steps == 2
        assert (decoder.compile_seconds > 0) if compiled else decoder.compile_seconds is None
        again = decoder.run(*left_padded(rows=5, width=20, seed=7, device="cuda"), max_new_tokens=48)
        assert decoder.cuda_graph is graph  # replayed, not captured again
    finally:
        decoder.close()
    second_mask = left_padded(rows=5, width=20, seed=7, device="cuda")[1]
    for prompt_mask, tokens in ((mask, out), (second_mask, again)):
        full_mask = torch.cat([prompt_mask, torch.ones_like(tokens[:, 20:])], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(input_ids=tokens, attention_mask=full_mask, position_ids=positions).logits.float()
        chosen_logits = logits[:, 19:-1]
        chosen = chosen_logits.gather(-1, tokens[:, 20:, None]).squeeze(-1)
        assert float((chosen_logits.max(-1).values - chosen).max()) < 0.1


@pytest.mark.gpu
@needs_gpu
def test_generate_compiles_the_decoders_layer_only_where_eval_decode_compile_says(tiny_model):
    """The evaluate job's generate on a GPU, in bf16, with each setting (the tokens of both are checked against plain
    forwards by test_graph_decoder_picks_argmax_tokens_on_the_gpu)."""
    torch._dynamo.reset()
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).cuda().eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = ["What causes anemia?", "Define hypertension in adults, briefly.", "Why?"]
    for compiled in (True, False):
        stats: dict = {}
        rows, _ = generate(model, tokenizer, prompts, max_new_tokens=24, min_new_tokens=24, batch_size=3, stats=stats,
                           decoder="graph", decode_compile=compiled)
        assert stats["decoder"] == "graph" and stats["compiled"] is compiled
        assert (stats["compile_s"] > 0) if compiled else stats["compile_s"] is None
        assert [r["generated_tokens"] for r in rows] == [24, 24, 24]


def test_evaluate_stage_with_the_graph_decoder_records_it_and_logs_progress_every_check(tiny_config, caplog,
                                                                                        monkeypatch):
    import logging

    import medcot.decoding
    import medcot.progress
    from medcot.evaluate import evaluate_stage
    from medcot.modeling import select_backend

    monkeypatch.setattr(medcot.progress, "LOG_EVERY_S", 0.0)
    monkeypatch.setattr(medcot.decoding, "CHECK_EVERY", 4)
    config = load_config(None, tiny_config("eval.decoder=graph", "eval.max_new_tokens=12"))
    with caplog.at_level(logging.INFO):
        assert evaluate_stage(config, select_backend(config.model), "before") == 0
    summary = json.loads((config.run_dir / "eval-before" / "summary.json").read_text())
    assert summary["decoder"] == "graph" and summary["decoder_why"] == "eval.decoder graph"
    assert summary["decode_attention"] == "sdpa" and summary["decode_compile_seconds"] is None
    assert summary["decode_compiled"] is False  # eval.decode_compile applies on a GPU only
    assert 0 < summary["decode_step_seconds"] < summary["generation_seconds"]
    steps = [r.getMessage() for r in caplog.records if r.name == "medcot.progress" and "answers ended" in r.getMessage()]
    assert steps and all("tokens/s" in line for line in steps)
    rows = [json.loads(line) for line in (config.run_dir / "eval-before" / "generations.jsonl").read_text().splitlines()]
    assert all(0 < r["generated_tokens"] <= 12 for r in rows)


def test_a_decoder_whose_cache_does_not_fit_leaves_the_model_as_it_was(monkeypatch):
    """Out of memory while allocating the cache (the second layer's keys here): no buffer stays, the attention is
    restored."""
    model = small_llama(layers=3)
    zeros, calls = torch.zeros, []

    def failing_zeros(*args, **kwargs):
        calls.append(args)
        if len(calls) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", failing_zeros)
    with pytest.raises(torch.OutOfMemoryError):
        GraphDecoder(model, batch=4, cache_len=40, eos_ids=[299], pad_id=0)
    monkeypatch.setattr(torch, "zeros", zeros)
    assert model.config._attn_implementation == "sdpa"
    assert not any("medcot" in name for name, _ in model.named_buffers())
