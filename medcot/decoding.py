"""medcot's greedy decoder: a static KV cache of its own, one compiled decoder layer, the whole step in one CUDA graph.

transformers' `generate` with a static cache (eval.decoder transformers) compiles the whole model's decoding step
(36-42 s on an H200 for the 8B model, 6 s again in every later process even with the compile cache), reads the whole
cache at every step, and waits for the GPU after every step (end-of-answer checks, the streamer): on an H200 (2026-12-02), that was
3-4 ms of every 21 ms step with the GPU idle. This decoder, for Llama-architecture models:

- runs the prompt through the model's own forward (prefill), the attention writing each layer's keys and values into
  that layer's cache buffers [batch, kv heads, prompt + max_new_tokens, head dim];
- decodes with the model's own modules (embedding, rotary embedding, decoder layers, norm, head), each decoder
  layer compiled by `torch.compile`: the 32 layers share their code and their shapes, so Dynamo traces and Inductor
  compiles one layer, and every other layer reuses it (the layer index is not specialized);
- captures one whole step, the choice of the next token and its bookkeeping included, in a CUDA graph, and replays
  it; the host reads the end-of-answer flags every CHECK_EVERY steps, so the GPU never waits for it in between;
- computes attention over each row's valid cache positions only (medcot.kernels on a GPU, with eval.decode_kernel
  triton), or over the whole cache under a mask with PyTorch's kernels (the other decode_kernel values, and CPUs).

Greedy only: sampling goes through transformers' `generate`. On a CPU the same code runs eagerly (no compile, no
graph): the tests hold its tokens to transformers' `generate`.
"""

from __future__ import annotations

import logging
import time
from itertools import pairwise

import torch

log = logging.getLogger(__name__)

IMPLEMENTATION = "medcot_graph_decode"
ARCHITECTURES = ("llama",)
CHECK_EVERY = 16  # decoding steps between two reads of the end-of-answer flags
KERNELS = ("triton", "sdpa", "efficient", "matmul")


def supported(model) -> str | None:
    """None when this decoder can run `model`, else why not."""
    config = model.config
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        return f"model_type {getattr(config, 'model_type', None)!r} (supported: {', '.join(ARCHITECTURES)})"
    inner = getattr(model, "model", None)
    for name in ("embed_tokens", "rotary_emb", "layers", "norm"):
        if not hasattr(inner, name):
            return f"the model has no model.{name}"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager", "medcot_sdpa_gqa_decode", IMPLEMENTATION):
        return f"attention {config._attn_implementation!r} (the decoder's own replaces sdpa or eager only)"
    return None


def resolve_kernel(choice: str, device: torch.device, head_dim: int, groups: int) -> str:
    """eval.decode_kernel for this decoder: auto = triton on CUDA GPUs where Triton and the head size allow it,
    else what medcot.attention picks for PyTorch's kernels."""
    from medcot import attention

    if choice == "triton" or (choice == "auto" and device.type == "cuda"):
        if device.type == "cuda" and _triton_supports(head_dim, groups):
            return "triton"
        if choice == "triton":
            raise ValueError(f"eval.decode_kernel triton needs a CUDA GPU and Triton, and a head size that is a power "
                             f"of two from 16 (this model: {head_dim}, on {device.type}); set eval.decode_kernel auto")
    return attention.resolve_kernel("auto" if choice == "triton" else choice, device)


def _triton_supports(head_dim: int, groups: int) -> bool:
    try:
        from medcot import kernels
    except ImportError:
        return False
    return kernels.supports(head_dim, groups)


# ---- the attention of a decoding step --------------------------------------------------------------

@torch.library.custom_op("medcot::gqa_decode", mutates_args=())
def gqa_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot: torch.Tensor, start: torch.Tensor,
               scale: float, kernel: str) -> torch.Tensor:
    """Attention of query [b, kv_heads, groups, d] over the cache positions [start[b], slot] of key/value
    [b, kv_heads, positions, d]; an opaque op to the compiler, so that the Triton kernel's launch and PyTorch's
    kernel choice stay as they are inside the compiled layer."""
    if kernel == "triton":
        from medcot import kernels

        return kernels.gqa_decode(query, key, value, slot, start, scale)
    from medcot.attention import grouped_attention

    positions = torch.arange(key.shape[2], device=key.device)
    mask = (positions >= start[:, None]) & (positions <= slot)
    return grouped_attention(kernel, query, key, value, mask[:, None, None, :], scale).contiguous()


@gqa_decode.register_fake
def _(query, key, value, slot, start, scale, kernel):
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      medcot_slot=None, medcot_start=None, medcot_kernel="sdpa", **kwargs):
    """An AttentionInterface function. Prefill (no medcot_slot): stores the prompt's keys and values at the start of
    the layer's cache and attends as SDPA does. A decoding step: writes the step's key and value at `medcot_slot`
    and attends each row's valid positions."""
    cache_k, cache_v = module.medcot_k, module.medcot_v
    if medcot_slot is None:
        cache_k[:, :, :key.shape[2]].copy_(key)
        cache_v[:, :, :value.shape[2]].copy_(value)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    cache_k.index_copy_(2, medcot_slot, key)
    cache_v.index_copy_(2, medcot_slot, value)
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = gqa_decode(grouped, cache_k, cache_v, medcot_slot, medcot_start, scaling, medcot_kernel)
    return out.reshape(batch, 1, heads, dim), None


class _PassThrough:
    """The decoder layers' past_key_values: they hand it a step's keys and values and get them back (the attention
    above stores them), without reading the layer index, so that one compiled layer serves them all."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states


# ---- the decoder ------------------------------------------------------------------------------------

class StepClock:
    """When each group of decoding steps ended: the steady step and what the first steps cost beyond it."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.marks: list[tuple[int, float]] = []

    def mark(self, steps: int) -> None:
        self.marks.append((steps, time.monotonic()))

    def step_seconds(self, skip: int = 1) -> float | None:
        """The median seconds per step over the groups after the first `skip` ones."""
        rates = sorted((t1 - t0) / (n1 - n0) for (n0, t0), (n1, t1) in pairwise(self.marks[skip:]) if n1 > n0)
        return rates[len(rates) // 2] if rates else None

    def warmup_seconds(self, skip: int = 1) -> float:
        step = self.step_seconds(skip)
        if step is None or not self.marks:
            return 0.0
        steps, t = self.marks[skip - 1] if skip else (0, self.t0)
        return max(t - self.t0 - steps * step, 0.0)


class GraphDecoder:
    """Greedy decoding of batches of `batch` rows, prompts up to `cache_len - max_new_tokens` tokens (left-padded).

    One decoder serves every batch of a `generate` call: its cache buffers, compiled layer and CUDA graph are made
    for the first and replayed for the rest. `close()` gives the buffers back and restores the model's attention.
    """

    def __init__(self, model, *, batch: int, cache_len: int, eos_ids: list[int], pad_id: int, kernel: str = "auto",
                 compile: bool | None = None, graph: bool | None = None, compile_backend: str = "inductor") -> None:
        why = supported(model)
        if why:
            raise ValueError(f"eval.decoder graph cannot decode this model: {why}; set eval.decoder transformers")
        self.model = model
        inner = model.model
        config = model.config
        self.device = next(model.parameters()).device
        cuda = self.device.type == "cuda"
        self.batch, self.cache_len = batch, cache_len
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads
        self.kernel = resolve_kernel(kernel, self.device, head_dim, config.num_attention_heads // kv_heads)
        self.compile = cuda if compile is None else compile
        self.graph_enabled = cuda if graph is None else graph
        self.previous_attention = config._attn_implementation
        self.cuda_graph: torch.cuda.CUDAGraph | None = None
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(IMPLEMENTATION, attention_forward)
        AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)
        model.set_attn_implementation(IMPLEMENTATION)
        dtype = inner.embed_tokens.weight.dtype
        try:
            for layer in inner.layers:
                for name in ("medcot_k", "medcot_v"):
                    layer.self_attn.register_buffer(
                        name, torch.zeros(batch, kv_heads, cache_len, head_dim, device=self.device, dtype=dtype),
                        persistent=False)
        except BaseException:  # out of memory: the model as it was, for a smaller batch or another decoder
            self.close()
            raise
        self.layers = list(inner.layers)
        if self.compile:
            self.layers = [torch.compile(layer, fullgraph=True, dynamic=False, backend=compile_backend)
                           for layer in self.layers]
        # The step's state, in place: the graph reads and advances it.
        new = dict(device=self.device)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, **new)  # the token each row feeds next
        self.slot = torch.zeros(1, dtype=torch.long, **new)  # the cache position it is written at
        self.start = torch.zeros(batch, dtype=torch.long, **new)  # each row's first real position (left padding)
        self.step = torch.zeros(1, dtype=torch.long, **new)  # tokens generated so far
        self.min_new = torch.zeros(1, dtype=torch.long, **new)
        self.done = torch.zeros(batch, dtype=torch.bool, **new)
        self.out = torch.zeros(batch, 1, dtype=torch.long, **new)
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, **new)
        self.eos_columns = torch.zeros(config.vocab_size, dtype=torch.bool, **new)
        self.eos_columns[self.eos[self.eos < config.vocab_size]] = True
        self.pad = pad_id
        self.eager_steps = 0  # decoding steps run before the graph was captured (compile, warm-up)
        self.compile_seconds: float | None = None

    # -- one step, and what it feeds back
    def _advance(self, logits: torch.Tensor) -> None:
        logits = logits.float().masked_fill(self.eos_columns & (self.step < self.min_new), float("-inf"))
        chosen = torch.where(self.done, self.pad, logits.argmax(dim=-1))
        self.out.index_copy_(1, self.step, chosen[:, None])
        self.done |= torch.isin(chosen, self.eos)
        self.tokens.copy_(chosen[:, None])
        self.step += 1

    def _decode_step(self) -> None:
        inner = self.model.model
        hidden = inner.embed_tokens(self.tokens)
        positions = (self.slot - self.start)[:, None]
        rotary = inner.rotary_emb(hidden, positions)
        # A row that has ended still runs through the step (the batch's shapes are the graph's), but its token is
        # thrown away: its attention reads the current position only, not its whole answer so far.
        start = torch.where(self.done, self.slot, self.start)
        cache = _PassThrough()
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, past_key_values=cache,
                           position_embeddings=rotary, medcot_slot=self.slot, medcot_start=start,
                           medcot_kernel=self.kernel)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        self._advance(self.model.lm_head(inner.norm(hidden[:, -1])))
        self.slot += 1

    def _run_step(self) -> None:
        if self.cuda_graph is not None:
            self.cuda_graph.replay()
            return
        # Dynamo treats each layer's index as an input, not a constant: one compiled layer for all of them.
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            if not self.graph_enabled:
                self._timed_eager_step()
            elif self.eager_steps < 2:  # the first two compile and warm up, on a side stream
                stream = torch.cuda.Stream(self.device)
                stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(stream):
                    self._timed_eager_step()
                torch.cuda.current_stream(self.device).wait_stream(stream)
            else:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # records the step (which does not run) ...
                    self._decode_step()
                self.cuda_graph = graph
                graph.replay()  # ... and runs it

    def _timed_eager_step(self) -> None:
        t = time.monotonic()
        self._decode_step()
        if self.compile and self.eager_steps == 0:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.compile_seconds = round(time.monotonic() - t, 2)
        self.eager_steps += 1

    # -- a batch
    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
            min_new_tokens: int = 0, on_steps=None) -> torch.Tensor:
        """[rows, prompt + max_new_tokens] like `generate`: the prompts, then each row's tokens, `pad_id` after its
        end. `on_steps(steps, ended)` is called every CHECK_EVERY steps."""
        rows, width = input_ids.shape
        if rows != self.batch or width + max_new_tokens > self.cache_len:
            raise ValueError(f"a batch of {rows} x {width} + {max_new_tokens} new tokens does not fit a decoder "
                             f"made for {self.batch} rows and {self.cache_len} positions")
        if self.out.shape[1] != max_new_tokens:
            if self.cuda_graph is not None:
                raise ValueError("max_new_tokens changed after the decoding step was captured: make a new decoder")
            self.out = torch.zeros(self.batch, max_new_tokens, dtype=torch.long, device=self.device)
        self.start.copy_(width - attention_mask.sum(dim=1))
        self.step.zero_()
        self.min_new.fill_(min_new_tokens)
        self.done.zero_()
        self.out.fill_(self.pad)
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            use_cache=False, logits_to_keep=1).logits[:, -1]
        self._advance(logits)
        self.slot.fill_(width)
        for steps in range(1, max_new_tokens):
            self._run_step()
            if (steps + 1) % CHECK_EVERY == 0 or steps + 1 == max_new_tokens:
                ended = int(self.done.sum())  # waits for the GPU
                if on_steps:
                    on_steps(steps + 1, ended)
                if ended == rows:
                    break
        return torch.cat([input_ids, self.out.clone()], dim=1)

    def close(self) -> None:
        for layer in self.model.model.layers:
            for name in ("medcot_k", "medcot_v"):
                layer.self_attn._buffers.pop(name, None)
        self.cuda_graph = None
        self.model.set_attn_implementation(self.previous_attention)
