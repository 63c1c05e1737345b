"""bench/q8_0_rounding.py's simulation of llama.cpp's q8_0 and its SmoothQuant and rotation transforms, on a tiny random Llama with
grouped-query attention and a tied head (as SmolLM2's): each does what the benchmark's figures say it does."""

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a package of the repository, not an installed one

from bench.q8_0_rounding import (  # noqa: E402
    hadamard,
    input_absmax,
    q8_0_activations,
    q8_0_weights,
    rotated,
    simulated,
    smoothed,
)


def tiny_gqa_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1 and an outlier channel, as trained models have
        for layer in model.model.layers:
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.input_layernorm.weight[7] = 20.0
        model.model.norm.weight.uniform_(0.5, 2.0)
    return model


TEXTS = [torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(3)]


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_activation_rounding_is_ggml_q8_0_blocks_with_a_float16_scale():
    x = torch.randn(8, 96) * torch.linspace(0.1, 10, 96)
    x[3, 5] = 0.0
    x[4, 32:64] = 0.0  # an all-zero block stays zero
    ours = q8_0_activations(x)
    quantized = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
    theirs = torch.from_numpy(gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0))
    scale = (x.reshape(-1, 32).abs().amax(1) / 127).half().float().repeat_interleave(32).reshape(x.shape)
    # the same 8-bit value and float16 scale but where rounding ties (ggml's x86 code rounds half to even, gguf-py's away)
    assert ((ours - theirs).abs() <= scale * 1.0001).all()
    assert (ours != theirs).float().mean() < 0.01
    assert torch.equal(ours[4, 32:64], torch.zeros(32))
    assert not torch.equal(ours, x)


def test_weight_rounding_is_what_gguf_py_writes_to_the_q8_0_file():
    w = torch.randn(16, 64)
    data = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(q8_0_weights(w).numpy(), gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0))


def test_smoothquant_moves_scale_between_norms_and_matrices_and_leaves_the_logits():
    model, reference = tiny_gqa_llama(), tiny_gqa_llama()
    stats = input_absmax(model, TEXTS)
    assert set(stats) == {f"{i}.{k}" for i in range(2) for k in ("qkv", "o", "gate_up", "down")}
    smoothed(model, stats, 0.5)
    for layer, before in zip(model.model.layers, reference.model.layers, strict=True):
        for a, b in ((layer.input_layernorm, before.input_layernorm), (layer.mlp.up_proj, before.mlp.up_proj),
                     (layer.self_attn.v_proj, before.self_attn.v_proj), (layer.self_attn.o_proj, before.self_attn.o_proj)):
            assert not torch.allclose(a.weight, b.weight)
    # the outlier channel's norm weight is the one pulled down most
    ratio = model.model.layers[0].input_layernorm.weight / reference.model.layers[0].input_layernorm.weight
    assert ratio.argmin() == 7
    for ids in TEXTS:
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weights,activations", [(True, False), (False, True), (True, True)])
def test_simulated_rounding_touches_what_it_names_and_nothing_else(weights, activations):
    model, reference = tiny_gqa_llama(), tiny_gqa_llama()
    simulated(model, lambda name: "v_proj" in name, weights=weights, activations=activations)
    ours = dict(model.named_parameters())
    for name, q in reference.named_parameters():
        rounded = weights and "v_proj" in name
        assert torch.equal(ours[name], q8_0_weights(q) if rounded else q), name
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    moved = (logits(model, TEXTS[0]) - logits(reference, TEXTS[0])).abs().max()
    assert 0 < moved < 0.1 * logits(reference, TEXTS[0]).std()


def test_rounding_the_tied_head_rounds_the_embeddings_it_is_stored_with():
    model, reference = tiny_gqa_llama(), tiny_gqa_llama()
    simulated(model, lambda name: name == "lm_head", activations=False)
    expected = q8_0_weights(reference.lm_head.weight)
    assert torch.equal(model.lm_head.weight, expected)
    assert torch.equal(model.model.embed_tokens.weight, expected)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, reference.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("n", [1, 16, 12, 48, 576])
def test_hadamard_matrices_are_orthonormal_with_entries_of_one_magnitude(n):
    h = hadamard(n)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))


def test_hadamard_refuses_an_order_it_cannot_build():
    with pytest.raises(ValueError, match="order 36"):
        hadamard(36)


def q_proj_inputs(model) -> torch.Tensor:
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    logits(model, TEXTS[0])
    hook.remove()
    return seen[0]


def test_rotation_folds_the_norms_unties_the_head_and_leaves_the_logits():
    model, reference = tiny_gqa_llama(), tiny_gqa_llama()
    rotated(model)
    assert not model.config.tie_word_embeddings
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert not torch.allclose(p, reference.state_dict()[name]), name
    for ids in TEXTS:
        torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=1e-4, atol=1e-4)


def test_rotation_spreads_the_outlier_channel_that_8_bit_activations_round_badly():
    model, reference = tiny_gqa_llama(), tiny_gqa_llama()
    with torch.no_grad():  # an outlier channel in the residual stream itself, not only in a norm's weight
        for m in (model, reference):
            m.model.embed_tokens.weight[:, 11] *= 30
    rotated(model)

    def rounding_error(x: torch.Tensor) -> float:
        return float((q8_0_activations(x) - x).norm() / x.norm())

    before, after = rounding_error(q_proj_inputs(reference)), rounding_error(q_proj_inputs(model))
    print(f"q_proj's input, 8-bit rounding error: {before:.5f} before the rotation, {after:.5f} after")
    assert after < 0.6 * before
