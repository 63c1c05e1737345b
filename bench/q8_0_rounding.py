"""Where q8_0's disagreement with transformers comes from, on more questions than the tests' 10: the demo's SmolLM2-135M
(trained as bench/gguf_agreement.py trains it), the tests' 10 evaluate-job questions and 50 more from the bundled
sample, first 32 greedy tokens of transformers in float32 on the merged weights.

    .venv/bin/python bench/q8_0_rounding.py --out /tmp/q8_0-rounding          # ~21 minutes on 2 cores

Each row decodes along transformers' greedy answers (teacher-forced) and prints: on how many questions it writes all
32 tokens as transformers does, the share of tokens whose top-1 is transformers', and the mean KL divergence per token
from transformers' next-token distribution. The rows:
- llama.cpp itself on the exported f16 and q8_0 files (its logits for every position, each answer evaluated in one
  batch), and q8_0's greedy answers decoded token by token as the tests count them (whole answers only);
- transformers with q8_0's two roundings simulated: the weights (gguf-py's Q8_0 round trip, what the file holds) and
  the activations that enter every matrix product (ggml's quantize_row_q8_0, which llama.cpp's CPU and CUDA kernels
  apply to a q8_0 matrix's input: blocks of 32, a scale of absmax/127 kept in float16, values rounded to 8 bits);
  both, and both on one kind of matrix at a time;
- both on the model after a SmoothQuant-style equivalence transform (Xiao et al., 2022): each matrix's input channels
  scaled by s = max|x|^a / max|w|^(1-a), from the activations of 24 other sample rows, folded into the norm or matrix
  before it (exact in float32), which moves rounding from the activations to the weights; simulated, and in
  llama.cpp on that model's q8_0 file;
- both on the model after an offline rotation as QuaRot's (Ashkboos et al., 2024): the norms folded into the matrices
  after them, the residual stream turned by a randomised Hadamard matrix and each head's values by a Hadamard matrix
  (exact in float32; the head is untied from the embeddings), which spreads an activation's outlier channels over all
  of them; simulated, and in llama.cpp on that model's q8_0 file, batched and token by token.
Writes OUT/q8_0-rounding-<date>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_export_llamacpp import (  # noqa: E402
    ANSWER_TOKENS,
    evaluate_prompts,
    gguf_file,
    llama_answers_agreed,
    load,
    merged,
    trained_demo,
    transformers_model,
)

from bench.demo import cpu_name  # noqa: E402
from medcot.export import GgufModel, write_gguf  # noqa: E402
from medcot.prompts import TRAIN_TEMPLATE, answer_end_id, serving_prompt  # noqa: E402

SAMPLE = ROOT / "data" / "sample" / "medical_o1_sample.jsonl"
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


def q8_0_activations(x: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0 and back: blocks of 32 along the last axis, d = absmax/127 stored as float16."""
    blocks = x.reshape(-1, 32)
    amax = blocks.abs().amax(1, keepdim=True)
    inverse = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    return (torch.round(blocks * inverse) * (amax / 127).half().float()).reshape(x.shape)


def q8_0_weights(weight: torch.Tensor) -> torch.Tensor:
    """gguf-py's Q8_0 round trip: what the q8_0 file holds of `weight`."""
    import gguf

    data = gguf.quants.quantize(weight.detach().float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q8_0))


def simulated(model, rounds: Callable[[str], bool], weights: bool = True, activations: bool = True):
    """`model` with Q8_0's weight and/or activation rounding on every matrix whose name `rounds`, in place. The tied
    output head gets its own copy; rounding its weights rounds the embeddings too (the file holds one q8_0 matrix for
    both, and llama.cpp's get_rows reads the embeddings from it)."""
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        if weights and rounds("lm_head"):
            model.model.embed_tokens.weight.copy_(q8_0_weights(model.model.embed_tokens.weight))
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and rounds(name):
                if weights:
                    module.weight.copy_(q8_0_weights(module.weight))
                if activations:
                    module.register_forward_pre_hook(lambda _module, args: (q8_0_activations(args[0]),))
    return model


def input_absmax(model, texts: list[list[int]]) -> dict[str, torch.Tensor]:
    """Per layer, the largest |activation| of each input channel of the attention, o_proj, MLP and down_proj."""
    stats: dict[str, torch.Tensor] = {}

    def record(key: str):
        def hook(_module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)
            stats[key] = torch.maximum(stats[key], x) if key in stats else x
        return hook

    hooks = []
    for i, layer in enumerate(model.model.layers):
        for key, module in ((f"{i}.qkv", layer.self_attn.q_proj), (f"{i}.o", layer.self_attn.o_proj),
                            (f"{i}.gate_up", layer.mlp.gate_proj), (f"{i}.down", layer.mlp.down_proj)):
            hooks.append(module.register_forward_pre_hook(record(key)))
    with torch.no_grad():
        for ids in texts:
            model(torch.tensor([ids]))
    for hook in hooks:
        hook.remove()
    return stats


def smoothed(model, stats: dict[str, torch.Tensor], alpha: float):
    """The SmoothQuant transform, in place: x/s into each matrix, its columns times s. The norm before q/k/v and before
    gate/up takes 1/s; down_proj's input is silu(gate) * up, so up's rows take it; o_proj's input channel (head h, d)
    is v's output channel (h's key-value head, d), so v's rows take it, one scale per key-value channel."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim, group = config.hidden_size // heads, heads // kv_heads

    def scales(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(1e-3, 1e3)

    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attention, mlp = layer.self_attn, layer.mlp
            for norm, key, matrices in ((layer.input_layernorm, "qkv", (attention.q_proj, attention.k_proj, attention.v_proj)),
                                        (layer.post_attention_layernorm, "gate_up", (mlp.gate_proj, mlp.up_proj))):
                s = scales(stats[f"{i}.{key}"], torch.stack([m.weight.abs().amax(0) for m in matrices]).amax(0))
                norm.weight.div_(s)
                for m in matrices:
                    m.weight.mul_(s)
            s = scales(stats[f"{i}.down"], mlp.down_proj.weight.abs().amax(0))
            mlp.up_proj.weight.div_(s[:, None])
            mlp.down_proj.weight.mul_(s)
            x = stats[f"{i}.o"].view(kv_heads, group, head_dim).amax(1)
            w = attention.o_proj.weight.abs().amax(0).view(kv_heads, group, head_dim).amax(1)
            s = scales(x, w)
            attention.v_proj.weight.div_(s.reshape(-1)[:, None])
            attention.o_proj.weight.mul_(s[:, None, :].expand(kv_heads, group, head_dim).reshape(-1))
    return model


def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order n, in float64: Sylvester's for a power of two, and for n = 12^k * 2^m
    (SmolLM2's 576 = 12 * 12 * 4) a Kronecker product with Paley's of order 12."""
    def paley12() -> np.ndarray:  # Paley's construction I for q = 11: I + [[0, 1], [-1, Jacobsthal matrix]]
        q = 11
        chi = [0] + [1 if pow(i, (q - 1) // 2, q) == 1 else -1 for i in range(1, q)]
        s = np.zeros((q + 1, q + 1))
        s[0, 1:], s[1:, 0] = 1, -1
        s[1:, 1:] = [[chi[(j - i) % q] for j in range(q)] for i in range(q)]
        return np.eye(q + 1) + s

    h, rest = np.ones((1, 1)), n
    while rest % 12 == 0:
        h, rest = np.kron(h, paley12()), rest // 12
    if rest & (rest - 1):
        raise ValueError(f"no Hadamard matrix of order {n} here: n must be 12^k * 2^m")
    while rest > 1:
        h, rest = np.block([[h, h], [h, -h]]), rest // 2
    return torch.from_numpy(h / np.sqrt(n))


def rotated(model, seed: int = 0):
    """QuaRot's offline rotation, in place, which llama.cpp runs as a plain Llama: each RMSNorm's weight folded into the
    matrices it feeds (then 1), the residual stream x turned into x Q with Q = diag(random signs) H, so the
    embeddings and every matrix that reads the stream take Q on their input side and o_proj and down_proj on their
    output side; each key-value head's values turned by a Hadamard matrix, undone by o_proj's columns. The output head
    is untied: it takes the final norm and Q, the embeddings only Q. Computed in float64."""
    config = model.config
    hidden, head_dim = config.hidden_size, config.hidden_size // config.num_attention_heads
    signs = torch.randint(0, 2, (hidden,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    q, h = signs[:, None] * hadamard(hidden), hadamard(head_dim)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False

    def set_(module, weight: torch.Tensor) -> None:
        module.weight.copy_(weight.to(module.weight.dtype))

    def fold(norm, matrices) -> None:
        for m in matrices:
            set_(m, m.weight.double() * norm.weight.double() @ q)
        norm.weight.fill_(1.0)

    with torch.no_grad():
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            fold(layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj))
            fold(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))
            set_(mlp.down_proj, q.T @ mlp.down_proj.weight.double())
            v = attention.v_proj.weight.double().view(-1, head_dim, hidden)
            set_(attention.v_proj, (h.T @ v).reshape(-1, hidden))
            o = attention.o_proj.weight.double().view(hidden, -1, head_dim)
            set_(attention.o_proj, q.T @ (o @ h).reshape(hidden, -1))
        fold(model.model.norm, (model.lm_head,))
        set_(model.model.embed_tokens, model.model.embed_tokens.weight.double() @ q)
    return model


def compare(logits: list[torch.Tensor], reference: list[torch.Tensor], answers: list[list[int]]) -> dict:
    """Whole answers written as transformers writes them, top-1 share and KL per token, from per-answer logits."""
    whole, top, kl, tokens = 0, 0, 0.0, 0
    for mine, theirs, answer in zip(logits, reference, answers, strict=True):
        same = mine.argmax(-1) == torch.tensor(answer)
        whole += bool(same.all())
        top += int(same.sum())
        tokens += len(answer)
        kl += float(torch.nn.functional.kl_div(mine.log_softmax(-1), theirs.log_softmax(-1), log_target=True,
                                               reduction="sum"))
    return {"whole": whole, "top1": top / tokens, "kl": kl / tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the run (model, merge, export) and the results JSON")
    parser.add_argument("--steps", type=int, default=24, help="training steps of the demo model (the tests': 24)")
    parser.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength")
    args = parser.parse_args()

    import llama_cpp
    from transformers import AutoTokenizer

    started = time.monotonic()
    out = Path(args.out)
    config = trained_demo(out, args.steps, run_name=f"agreement-{args.steps}")
    folder = merged(config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    prompts = [tokenizer(p)["input_ids"] for p in evaluate_prompts(config, tokenizer, "recipe")]
    prompts += [tokenizer(serving_prompt("recipe", tokenizer, r["Question"]))["input_ids"] for r in rows[60:110]]
    calibration = [tokenizer(TRAIN_TEMPLATE.format(r["Question"], r["Complex_CoT"], r["Response"]))["input_ids"][:1024]
                   for r in rows[:24]]

    reference_model = transformers_model(folder)
    with torch.no_grad():
        answers = [reference_model.generate(torch.tensor([p]), max_new_tokens=ANSWER_TOKENS, do_sample=False,
                                            pad_token_id=tokenizer.eos_token_id)[0, len(p):].tolist() for p in prompts]

    def logits_of(model) -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(torch.tensor([p + a])).logits[0, len(p) - 1:-1] for p, a in zip(prompts, answers, strict=True)]

    reference = logits_of(reference_model)
    results = []

    def report(label: str, logits: list[torch.Tensor]) -> None:
        first10 = compare(logits[:10], reference[:10], answers[:10])["whole"]
        row = {"label": label, "whole_of_10": first10, **compare(logits, reference, answers)}
        results.append(row)
        print(f"  {label:<44} {first10:>2}/10 {row['whole']:>3}/{len(prompts)}  top-1 {row['top1']:.4f}  "
              f"KL/token {row['kl']:.5f}   [{time.monotonic() - started:.0f} s]", flush=True)

    print(f"demo model, {args.steps} steps; {len(prompts)} questions (the tests' 10, then 50 of the sample), first "
          f"{ANSWER_TOKENS} greedy tokens of transformers float32: whole answers of the 10, of all, top-1, KL")

    def llama_logits(path: Path) -> list[torch.Tensor]:
        """llama.cpp's logits along each answer, the prompt and the answer evaluated in one batch."""
        llm = load(llama_cpp, path, logits_all=True)
        logits = []
        for p, a in zip(prompts, answers, strict=True):
            llm.reset()
            llm.eval(p + a)
            logits.append(torch.from_numpy(np.array(llm.scores[len(p) - 1:len(p) + len(a) - 1], dtype=np.float32)))
        llm.close()
        return logits

    for type_name in ("f16", "q8_0"):
        report(f"llama.cpp {type_name}", llama_logits(gguf_file(config, type_name)))
    # As the tests count: llama.cpp's own greedy answer, token by token, and whether transformers writes it.
    end = answer_end_id("recipe", tokenizer)

    def greedy_whole(label: str, path: Path) -> None:
        llm = load(llama_cpp, path)
        answers_agreed = llama_answers_agreed(llama_cpp, llm, reference_model, prompts, end, ANSWER_TOKENS)
        llm.close()
        whole = [agreed == n and (n == ANSWER_TOKENS or ended) for n, agreed, ended in answers_agreed]
        results.append({"label": label, "whole_of_10": sum(whole[:10]), "whole": sum(whole)})
        print(f"  {label:<44} {sum(whole[:10]):>2}/10 {sum(whole):>3}/{len(prompts)}", flush=True)

    def q8_0_file(model, name: str) -> Path:
        """`model` saved in float32 beside the merged folder's tokenizer files, exported as q8_0 (its only rounding)."""
        saved = out / name
        model.save_pretrained(saved)
        for f in folder.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy(f, saved / f.name)
        path = out / f"{name}-Q8_0.gguf"
        write_gguf(GgufModel.read(saved, "recipe"), "q8_0", path, workers=2, name=name)
        return path

    greedy_whole("llama.cpp q8_0, its greedy answers token by token", gguf_file(config, "q8_0"))

    everything = lambda _name: True  # noqa: E731
    report("simulated: weights", logits_of(simulated(transformers_model(folder), everything, activations=False)))
    report("simulated: activations", logits_of(simulated(transformers_model(folder), everything, weights=False)))
    report("simulated: both (q8_0)", logits_of(simulated(transformers_model(folder), everything)))
    for kind in KINDS:
        report(f"simulated: both, {kind} only", logits_of(simulated(transformers_model(folder), lambda n, k=kind: k in n)))
    stats = input_absmax(reference_model, calibration)
    smooth = smoothed(transformers_model(folder), stats, args.alpha)
    exact = (logits_of(smooth)[0] - reference[0]).abs().max().item()
    smooth_file = q8_0_file(smooth, f"smoothquant-{args.alpha}")
    report(f"llama.cpp q8_0 after SmoothQuant a={args.alpha}", llama_logits(smooth_file))
    report(f"simulated: both, after SmoothQuant a={args.alpha}", logits_of(simulated(smooth, everything)))
    print(f"  (the transform alone moves the first answer's logits by at most {exact:.1e})")
    rotation = rotated(transformers_model(folder))
    rotated_weights, rotated_activations = copy.deepcopy(rotation), copy.deepcopy(rotation)
    rotation_exact = (logits_of(rotation)[0] - reference[0]).abs().max().item()
    rotation_file = q8_0_file(rotation, "rotated")
    report("llama.cpp q8_0 after the rotation", llama_logits(rotation_file))
    greedy_whole("llama.cpp q8_0 after the rotation, token by token", rotation_file)
    report("simulated: both, after the rotation", logits_of(simulated(rotation, everything)))
    report("simulated: weights, after the rotation", logits_of(simulated(rotated_weights, everything, activations=False)))
    report("simulated: activations, after the rotation", logits_of(simulated(rotated_activations, everything,
                                                                             weights=False)))
    print(f"  (the rotation alone moves the first answer's logits by at most {rotation_exact:.1e})")

    import transformers

    result = {"date": dt.date.today().isoformat(), "script": "bench/q8_0_rounding.py", "steps": args.steps,
              "machine": cpu_name(), "questions": len(prompts), "answer_tokens": ANSWER_TOKENS, "alpha": args.alpha,
              "smoothquant_max_logit_change": exact,
              "rotation_max_logit_change": rotation_exact, "llama_cpp_python": llama_cpp.__version__,
              "transformers": transformers.__version__, "torch": torch.__version__, "rows": results}
    path = out / f"q8_0-rounding-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
