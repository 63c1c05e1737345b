"""fp32 or bf16 on a CPU, part by part: the demo's three costs (prefill, a decoding step, a LoRA training step) for a
SmolLM2-135M-shaped model (random weights: they do not change the time), in each dtype, on this CPU as it is.

    python3 bench/cpu_dtype.py                                  # prints one line per dtype, JSON at the end
    ONEDNN_MAX_CPU_ISA=AVX2 taskset -c 0,1 python3 bench/cpu_dtype.py --label "AVX2 cap"

medcot picks bf16 on a CPU with AMX tiles or AVX-512 BF16 and fp32 elsewhere (medcot.modeling.cpu_has_native_bf16,
from this script's numbers on real CPUs of each kind). ONEDNN_MAX_CPU_ISA caps the instructions that oneDNN (PyTorch's
bf16 and fp32 matrix products on CPU) may use; `taskset -c 0,1` gives it the two cores of the demo's VM. A cap is no
stand-in for another CPU: a Xeon with AMX capped to AVX512_CORE_BF16 ran bf16 slower than fp32, where an AMD EPYC
with AVX-512 BF16 runs it 1.7-2.1x faster; measure on the CPU itself. Shapes as the demo's: 21 prompts of 179-239
tokens left-padded to 239, decoding at batch 21, training steps of 2 rows of 490 tokens with LoRA r=16 on every
projection and AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True, rms_norm_eps=1e-5)
PROMPTS, PADDED_LEN = 21, 239
TRAIN_ROWS, TRAIN_LEN = 2, 490


def build(dtype: torch.dtype, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**{**SMOLLM2_135M, "num_hidden_layers": layers})
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype).eval()


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def prefill_and_decode(model, steps: int) -> tuple[float, float]:
    """(prefill seconds, median decoding step seconds) of transformers' generate on left-padded prompts."""
    from transformers.generation.streamers import BaseStreamer

    class Marks(BaseStreamer):
        def __init__(self):
            self.t: list[float] = []

        def put(self, value):
            self.t.append(time.perf_counter())

        def end(self):
            pass

    ids = torch.randint(100, 40000, (PROMPTS, PADDED_LEN))
    mask = torch.ones_like(ids)
    for row in range(PROMPTS):  # ragged prompts, 239 down to 179 tokens: left padding
        mask[row, :row * 3] = 0
        ids[row, :row * 3] = 0
    marks = Marks()
    t0 = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                   pad_token_id=0, streamer=marks)
    t = marks.t  # t[0]: the prompts; t[1]: the first token (prefill); then one mark per step
    step_times = [b - a for a, b in zip(t[2:-1], t[3:], strict=True)]
    return t[1] - t0, statistics.median(step_times[2:])


def train_step_seconds(model, dtype: torch.dtype, repeat: int) -> float:
    """Forward, backward and AdamW of LoRA r=16 on every projection, under autocast as TrainingArguments(bf16=True)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model.train(), LoraConfig(r=16, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # the trainer keeps trainable weights in fp32
        p.data = p.data.float()
    optim = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(100, 40000, (TRAIN_ROWS, TRAIN_LEN))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()

    step()  # warm-up
    return timed(step, repeat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="", help="what this run is (the CPU, the ISA cap)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--steps", type=int, default=24, help="decoding steps per measurement")
    parser.add_argument("--train-repeat", type=int, default=3)
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"], help="fewer: a quick check")
    args = parser.parse_args()
    from medcot.modeling import cpu_has_native_bf16

    meta = {"label": args.label, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "(not set)"),
            "medcot_picks": "bfloat16" if cpu_has_native_bf16() else "float32"}
    print(json.dumps(meta), flush=True)
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        model = build(dtype, args.layers)
        prefill, step = prefill_and_decode(model, args.steps)
        train = train_step_seconds(model, dtype, args.train_repeat)
        rows.append({"dtype": name, "prefill_s": round(prefill, 2), "decode_step_s": round(step, 4),
                     "train_step_s": round(train, 2),
                     "train_tokens_per_s": round(TRAIN_ROWS * TRAIN_LEN / train, 1)})
        print(f"{args.label or 'this CPU'} {name:>9}: prefill {prefill:6.2f} s  decoding step {step:.4f} s  "
              f"train step {train:6.2f} s ({rows[-1]['train_tokens_per_s']} tokens/s)", flush=True)
    print(json.dumps({**meta, "rows": rows}))


if __name__ == "__main__":
    main()
