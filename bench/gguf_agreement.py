"""How often llama.cpp's greedy answers from the exported GGUF files are transformers' own, and how much of the q8_0
gap is the model's: the demo's SmolLM2-135M trained for --steps steps (configs/demo.yaml), merged, exported as f16 and
q8_0, on the 10 evaluate-job questions that tests/test_export_llamacpp.py uses, first 32 greedy tokens.

    .venv/bin/python bench/gguf_agreement.py --out /tmp/agreement          # trains, merges and exports once (minutes)
    .venv/bin/python bench/gguf_agreement.py --out /tmp/agreement --steps 12

Needs llama-cpp-python (`make test` builds and installs it). Prints one line per comparison and writes
OUT/gguf-agreement-<date>.json. A comparison counts the questions on which the second side's greedy decoding writes
the first side's 32 tokens (teacher-forced, as the tests count). The references besides llama.cpp: transformers in
float32 on the merged float16 weights (the tests' reference); the same with every matrix rounded to Q8_0 by gguf-py
(blocks of 32 weights and a float16 scale, as in the q8_0 file; activations stay float32); transformers in bf16.
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


def q8_0_rounded(model) -> None:
    """Every matrix of `model` replaced by its Q8_0 round trip through gguf-py's own quantizer, in place."""
    import gguf

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                data = param.detach().float().numpy()
                quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                param.copy_(torch.from_numpy(gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0)))


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
    bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        reference_answers = [reference.generate(torch.tensor([p]), max_new_tokens=ANSWER_TOKENS, do_sample=False,
                                                pad_token_id=tokenizer.eos_token_id)[0, len(p):].tolist()
                             for p in prompts]
    llama_answers = {}
    for type_name in ("f16", "q8_0"):
        llm = load(llama_cpp, gguf_file(config, type_name))
        llama_answers[type_name] = [llama_greedy(llama_cpp, llm, p, ANSWER_TOKENS) for p in prompts]
        llm.close()

    comparisons = [
        ("llama.cpp f16", "transformers float32", llama_answers["f16"], reference),
        ("llama.cpp q8_0", "transformers float32", llama_answers["q8_0"], reference),
        ("transformers float32", "transformers on Q8_0-rounded weights", reference_answers, rounded),
        ("transformers float32", "transformers bf16", reference_answers, bf16),
        ("llama.cpp q8_0", "transformers on Q8_0-rounded weights", llama_answers["q8_0"], rounded),
    ]
    rows = []
    print(f"demo model, {args.steps} steps trained in {trained_dtype}; first {ANSWER_TOKENS} greedy tokens of 10 questions")
    for first, second, answers, model in comparisons:
        agreed = agreement(model, prompts, answers)
        same = sum(a == len(answer) for a, answer in zip(agreed, answers, strict=True))
        rows.append({"answers_of": first, "decoded_by": second, "same": same, "of": len(prompts), "agreed_tokens": agreed})
        print(f"  {first:<22} written by {second:<38} {same:>2} of {len(prompts)}  (tokens agreed: {agreed})")

    import transformers

    result = {"date": dt.date.today().isoformat(), "script": "bench/gguf_agreement.py", "steps": args.steps,
              "trained_dtype": trained_dtype, "machine": cpu_name(),
              "llama_cpp_python": llama_cpp.__version__, "transformers": transformers.__version__,
              "torch": torch.__version__, "rows": rows}
    path = out / f"gguf-agreement-{result['date']}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
