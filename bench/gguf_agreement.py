"""How often llama.cpp's greedy answers from the exported GGUF files are transformers' own, and how much of the q8_0
gap is the model's: the demo's SmolLM2-135M trained for --steps steps (configs/demo.yaml), merged, exported as f16 and
q8_0, on the 10 evaluate-job questions that tests/test_export_llamacpp.py uses, first 32 greedy tokens.

    .venv/bin/python bench/gguf_agreement.py --out /tmp/agreement          # trains, merges and exports once (minutes)
    .venv/bin/python bench/gguf_agreement.py --out /tmp/agreement --steps 12

Needs llama-cpp-python (`make test` builds and installs it). Prints one line per comparison and writes
OUT/gguf-agreement-<date>.json. A comparison counts the questions on which the second side's greedy decoding writes
the first side's 32 tokens (teacher-forced, as the tests count). The references besides llama.cpp: transformers in
float32 on the merged float16 weights (the tests' reference); the same with every matrix rounded to Q8_0 by gguf-py
(blocks of 32 weights and a float16 scale, as in the q8_0 file; activations stay float32), and with every matrix but
the token embeddings (SmolLM2's output head too); transformers in bf16. And one more GGUF file: llama.cpp's own
quantizer's q8_0 of the f16 file with the token embeddings and output head kept in f16 (llama-quantize
--token-embedding-type f16 --output-tensor-type f16), to see whether the head's rounding is what moves the answers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_export_llamacpp import (  # noqa: E402
    ANSWER_TOKENS,
    evaluate_prompts,
    gguf_file,
    llama_greedy,
    load,
    merged,
    trained_demo,
    transformers_agrees,
    transformers_model,
)

from bench.demo import cpu_name  # noqa: E402
from bench.q8_0_rounding import simulated  # noqa: E402


def q8_0_rounded(model, keep_embeddings: bool = False):
    """`model` with every matrix (but the tied embeddings and head, with `keep_embeddings`) replaced by what the q8_0
    file holds of it, in place: bench/q8_0_rounding.py's simulation with the weights' rounding alone."""
    return simulated(model, lambda name: not (keep_embeddings and name == "lm_head"), activations=False)


def q8_0_with_f16_embeddings(llama_cpp, f16: Path, out: Path) -> Path:
    """llama.cpp's own Q8_0 of the f16 file with the token embeddings and output head in f16."""
    import ctypes

    import gguf

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.token_embedding_type = params.output_tensor_type = int(gguf.GGMLQuantizationType.F16)
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {f16}")
    return out


def agreement(model, prompts: list[list[int]], answers: list[list[int]]) -> list[int]:
    """Per question, how many leading tokens of `answers` the model's greedy decoding writes."""
    return [transformers_agrees(model, prompt, answer) for prompt, answer in zip(prompts, answers, strict=True)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder of the run (model, merge, export) and the results JSON")
    parser.add_argument("--steps", type=int, default=24, help="training steps of the demo model (the tests': 24)")
    args = parser.parse_args()

    import llama_cpp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(args.out)
    config = trained_demo(out, args.steps, run_name=f"agreement-{args.steps}")
    trained_dtype = json.loads((config.run_dir / "train" / "summary.json").read_text())["dtype"]
    folder = merged(config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = [tokenizer(p)["input_ids"] for p in evaluate_prompts(config, tokenizer, "recipe")]

    reference = transformers_model(folder)
    rounded = transformers_model(folder)
    q8_0_rounded(rounded)
    rounded_but_embeddings = transformers_model(folder)
    q8_0_rounded(rounded_but_embeddings, keep_embeddings=True)
    bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        reference_answers = [reference.generate(torch.tensor([p]), max_new_tokens=ANSWER_TOKENS, do_sample=False,
                                                pad_token_id=tokenizer.eos_token_id)[0, len(p):].tolist()
                             for p in prompts]
    llama_answers = {}
    files = {type_name: gguf_file(config, type_name) for type_name in ("f16", "q8_0")}
    files["q8_0, f16 embeddings"] = q8_0_with_f16_embeddings(llama_cpp, files["f16"], out / "q8_0-f16-embeddings.gguf")
    for type_name, path in files.items():
        llm = load(llama_cpp, path)
        llama_answers[type_name] = [llama_greedy(llama_cpp, llm, p, ANSWER_TOKENS) for p in prompts]
        llm.close()

    comparisons = [
        ("llama.cpp f16", "transformers float32", llama_answers["f16"], reference),
        ("llama.cpp q8_0", "transformers float32", llama_answers["q8_0"], reference),
        ("llama.cpp q8_0, f16 embeddings", "transformers float32", llama_answers["q8_0, f16 embeddings"], reference),
        ("transformers float32", "transformers on Q8_0-rounded weights", reference_answers, rounded),
        ("transformers float32", "transformers on Q8_0-rounded weights but the embeddings", reference_answers,
         rounded_but_embeddings),
        ("transformers float32", "transformers bf16", reference_answers, bf16),
        ("llama.cpp q8_0", "transformers on Q8_0-rounded weights", llama_answers["q8_0"], rounded),
    ]
    rows = []
    print(f"demo model, {args.steps} steps trained in {trained_dtype}; first {ANSWER_TOKENS} greedy tokens of 10 questions")
    for first, second, answers, model in comparisons:
        agreed = agreement(model, prompts, answers)
        same = sum(a == len(answer) for a, answer in zip(agreed, answers, strict=True))
        rows.append({"answers_of": first, "decoded_by": second, "same": same, "of": len(prompts), "agreed_tokens": agreed})
        print(f"  {first:<30} written by {second:<55} {same:>2} of {len(prompts)}  (tokens agreed: {agreed})")

    import transformers

    result = {"date": dt.date.today().isoformat(), "script": "bench/gguf_agreement.py", "steps": args.steps,
              "trained_dtype": trained_dtype, "machine": cpu_name(),
              "llama_cpp_python": llama_cpp.__version__, "transformers": transformers.__version__,
              "torch": torch.__version__, "file_bytes": {k: v.stat().st_size for k, v in files.items()}, "rows": rows}
    path = out / f"gguf-agreement-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
