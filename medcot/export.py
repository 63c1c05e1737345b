"""The export job: the merged model as GGUF files that llama.cpp, Ollama and LM Studio load, and an Ollama Modelfile
that prompts and stops the model as it was trained.

    python jobs/export.py --config configs/demo.yaml      # after the merge job: outputs/<run>/export/

The files are written with gguf-py, llama.cpp's own library, from the merge job's folder, without llama.cpp's
converter. What llama.cpp reads besides the weights, and where a wrong value shows:
- tensor names from gguf-py's TensorNameMap, and the q and k projections' rows reordered for llama.cpp's rotary
  embedding (which rotates adjacent pairs, where transformers rotates the two halves of each head);
- the tokenizer: its tokens, their types, the BPE merges, BOS/EOS and whether BOS is added, and the name of the
  pre-tokenizer (the regex that cuts text before BPE): llama.cpp applies the regex the name stands for, so a wrong
  name tokenizes the same text into other tokens than training did;
- the end token: the token the model was trained to end its answers with (medcot.prompts.answer_end_id), which the
  merge job made the tokenizer's EOS, so that generation stops there;
- the chat template, which llama-server, llama-cli and LM Studio apply: the tokenizer's own for `data.template: chat`,
  the recipe's prompt as a Jinja template for `recipe` (the model never saw its tokenizer's chat template).

The tensors stream: threads read one block of rows at a time from the safetensors shards, convert it (rotary order,
float32, then the GGUF type with gguf-py's own quantizer) and write it at its place in the file, so memory holds a
few blocks, never the model, and the file is the same byte for byte whatever the number of threads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import struct
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType, TokenType
from transformers import AutoConfig

from medcot.config import RunConfig, save_config
from medcot.modeling import load_tokenizer
from medcot.progress import Progress
from medcot.prompts import answer_end_id, inference_prompt, serving_prompt
from medcot.rundir import LOW_DISK_BYTES, ResourceError, RunDir, StageError, free_bytes

log = logging.getLogger(__name__)

STAGE = "export"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
# config name -> (GGUF tensor type, the file type recorded in general.file_type, the suffix of the file's name)
TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType, str]] = {
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0, "Q8_0"),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16, "F16"),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16, "BF16"),
}
MODELFILE = "Modelfile"
# The Hub's Ollama integration (`ollama run hf.co/<repo>`) reads these two files of a repo: the Go template and the
# parameters (JSON); https://huggingface.co/docs/hub/ollama.
OLLAMA_TEMPLATE, OLLAMA_PARAMS = "template", "params"
# Rows converted at a time: about 4M weights (16 MB in float32, some 100 MB with the quantizer's temporaries).
BLOCK_WEIGHTS = 1 << 22


class ExportError(StageError):
    """The merged model cannot be written as GGUF (architecture, tokenizer); the message says why and what to do."""


# ---- the source: safetensors shards, read a block of rows at a time ------------------------------------------------

_SAFETENSORS_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}


@dataclass(frozen=True)
class SourceTensor:
    file: Path
    dtype: str  # safetensors' name: BF16, F16 or F32
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file

    @property
    def row_bytes(self) -> int:
        return self.shape[-1] * _SAFETENSORS_DTYPES[self.dtype]


def safetensors_index(folder: Path) -> dict[str, SourceTensor]:
    """Every tensor of a model folder's safetensors files, by name, from their headers (no data is read).

    The format is an 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}, then
    the data; reading it ourselves lets blocks of rows be read with pread, which keeps them out of the process's
    resident memory once converted (a memory map would count every page it touched)."""
    tensors: dict[str, SourceTensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder} holds no .safetensors files; rerun the merge job (make merge ARGS=--force)")
    for file in files:
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise ExportError(f"{file}: tensor {name} is {info['dtype']}; the export reads BF16, F16 or F32 weights")
            tensors[name] = SourceTensor(file, info["dtype"], tuple(info["shape"]), 8 + length + info["data_offsets"][0])
    return tensors


def _read_rows(fd: int, tensor: SourceTensor, first: int, last: int) -> np.ndarray:
    """Rows [first, last) of a tensor as float32 (exact for BF16 and F16); a vector is one row."""
    size = (last - first) * tensor.row_bytes
    raw = os.pread(fd, size, tensor.start + first * tensor.row_bytes)
    if len(raw) != size:
        raise ExportError(f"{tensor.file} ends before the data of one of its tensors; rerun the merge job")
    shape = (last - first, tensor.shape[-1])
    if tensor.dtype == "BF16":  # bfloat16 is the top half of a float32
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if tensor.dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype="<f4").reshape(shape).copy()


def rotary_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """q or k projection rows in llama.cpp's rotary order: within each head, the two halves interleaved (row j of the
    first half, then row j of the second), as llama.cpp's converter permutes them (LlamaModel.permute)."""
    head_dim = rows.shape[0] // heads
    return rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# ---- the plan: which tensors, in which type, where in the file ------------------------------------------------------

@dataclass(frozen=True)
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # rows first, as PyTorch and numpy order them
    qtype: GGMLQuantizationType
    source: SourceTensor | None = None
    values: np.ndarray | None = None  # a tensor computed here (rope_freqs), float32
    rotary_heads: int = 0  # q/k projections: the heads whose rows are reordered

    @property
    def row_bytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block * type_size

    @property
    def rows(self) -> int:
        return math.prod(self.shape[:-1])

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    def blocks(self) -> Iterator[tuple[int, int]]:
        """Row ranges converted at a time; whole heads for the q/k projections, whose permutation stays in a head."""
        step = max(1, BLOCK_WEIGHTS // self.shape[-1])
        if self.rotary_heads:
            head_rows = self.rows // self.rotary_heads
            step = max(1, step // head_rows) * head_rows
        for first in range(0, self.rows, step):
            yield first, min(first + step, self.rows)


def check_architecture(config, folder: Path) -> None:
    """Refuse what this writer cannot write faithfully, naming what it can."""
    architectures = getattr(config, "architectures", None) or [type(config).__name__]
    if architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"{folder} is a {architectures[0]}; the export job writes GGUF for "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)} (Llama 2 and 3, DeepSeek-R1-Distill-Llama, SmolLM2) "
                          "only. Convert other architectures with llama.cpp's convert_hf_to_gguf.py")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise ExportError(f"{folder}/config.json sets {flag}: true, which the export job does not write; "
                              "convert this model with llama.cpp's convert_hf_to_gguf.py")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise ExportError(f"{folder}/config.json: RoPE scaling {rope.get('rope_type')!r} is not written by the export "
                          "job (it writes none and llama3); convert with llama.cpp's convert_hf_to_gguf.py")


def _rope(config) -> dict[str, Any]:
    return dict(getattr(config, "rope_parameters", None) or {})


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config) -> np.ndarray:
    """The per-frequency factors of Llama 3.1's RoPE scaling, which llama.cpp reads as the rope_freqs tensor
    (the formula of llama.cpp's converter and of transformers' _compute_llama3_parameters)."""
    rope = _rope(config)
    dim = _head_dim(config)
    freqs = 1.0 / (rope.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for wavelen in 2 * math.pi / freqs:
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def plan_tensors(config, sources: dict[str, SourceTensor], qtype: GGMLQuantizationType) -> list[PlannedTensor]:
    """The GGUF's tensors in file order, each with its type: norms and computed tensors float32 as llama.cpp keeps
    them, the matrices `qtype` (float16 where a row does not split into its blocks, as llama.cpp's converter does)."""
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    planned: list[PlannedTensor] = []
    if _rope(config).get("rope_type") == "llama3":
        factors = llama3_rope_factors(config)
        planned.append(PlannedTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape,
                                     GGMLQuantizationType.F32, values=factors))
    for hf_name, source in sources.items():
        if hf_name.endswith(".rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd for the output when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{source.file}: tensor {hf_name} has no GGUF name in gguf-py's map for Llama; is this a "
                              "LlamaForCausalLM folder written by the merge job?")
        tensor_type = qtype
        if len(source.shape) == 1 or name.endswith("_norm.weight"):
            tensor_type = GGMLQuantizationType.F32
        elif source.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            tensor_type = GGMLQuantizationType.F16
        heads = 0
        if hf_name.endswith("q_proj.weight"):
            heads = config.num_attention_heads
        elif hf_name.endswith("k_proj.weight"):
            heads = config.num_key_value_heads
        planned.append(PlannedTensor(name, source.shape, tensor_type, source=source, rotary_heads=heads))
    return planned


# ---- the tokenizer ---------------------------------------------------------------------------------------------------

# The text llama.cpp's converter tokenizes to recognise a tokenizer's pre-tokenizer (convert_hf_to_gguf_update.py):
# runs of spaces, tabs and newlines, emoji, digit runs, CJK, Khmer, Cyrillic, repeated punctuation and contractions.
CHECK_TEXT = (
    '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 '
    '3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= '
    'нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure '
    'I\'ll make it, \'D you like some tea? We\'Ve a\'lL'
)
# Llama 3's split regex, from its tokenizer.json (llama.cpp's LLAMA3 pre-tokenizer implements the same).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's converter hashes the token ids of CHECK_TEXT (sha256 of str(ids), BOS included) and looks the hash up in a
# table of known tokenizers; these are its entries for the tokenizers medcot's tests check against llama.cpp.
KNOWN_TOKENIZER_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
}
# llama.cpp's pre-tokenizer names and, for each, the pre-tokenizer of the tokenizer.json of the model the name was
# registered from (GPT-2, Llama 3, SmolLM), and whether its BPE skips merging a word that is already a token
# (ignore_merges), which llama.cpp ties to the name.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS: dict[str, tuple[dict[str, Any], bool]] = {
    "gpt-2": (_BYTE_LEVEL, False),
    "llama-bpe": ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]}, True),
    "smollm": ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
               False),
}


def llama_cpp_tokenizer_hash(tokenizer) -> str:
    """The hash by which llama.cpp's converter recognises a tokenizer (get_vocab_base_pre)."""
    return hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def _as_llama_cpp_would(backend, name: str):
    """The tokenizer with llama.cpp's pre-tokenization for `name` in place of its own: same vocabulary and merges."""
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[name]
    spec.update(normalizer=None, pre_tokenizer=pre_tokenizer)
    spec["model"]["ignore_merges"] = ignore_merges
    return Tokenizer.from_str(json.dumps(spec))


def _pieces(tokenizer, text: str) -> list[str]:
    if tokenizer.normalizer is not None:
        text = tokenizer.normalizer.normalize_str(text)
    return [piece for piece, _ in tokenizer.pre_tokenizer.pre_tokenize_str(text)]


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the tokenizer's pre-tokenization.

    Found as llama.cpp's converter finds it, by tokenizing CHECK_TEXT, but by trying each name instead of looking up a
    hash: the tokenizer rebuilt with a name's pre-tokenizer and ignore_merges (its own vocabulary and merges kept) must
    give the same tokens as the tokenizer itself. A fine-tuned model keeps its base's tokenizer, so this works for
    tokenizers that no table lists, such as SmolLM2's as transformers converts it from GGUF (GPT-2's pre-tokenizer,
    where SmolLM's own splits digits; on its vocabulary, which merges no digits, both give the same tokens). Of
    several such names, the one llama.cpp's table gives the tokenizer's hash comes first, then one whose pieces of
    CHECK_TEXT are the tokenizer's own (the same split on any text), then the first."""
    backend = tokenizer.backend_tokenizer
    model = json.loads(backend.to_str())["model"]
    if model.get("type") != "BPE" or backend.pre_tokenizer is None:
        raise ExportError(f"the tokenizer of {tokenizer.name_or_path} is not a byte-level BPE ({model.get('type')}); "
                          "the export job writes byte-level BPE tokenizers (Llama 3, GPT-2, SmolLM2)")
    ids = backend.encode(CHECK_TEXT, add_special_tokens=False).ids
    if backend.decode(ids, skip_special_tokens=False) != CHECK_TEXT:
        raise ExportError(f"the tokenizer of {tokenizer.name_or_path} does not give text back as it was (byte-level BPE "
                          "does, and llama.cpp's tokenizers assume it); convert this model with llama.cpp's "
                          "convert_hf_to_gguf.py")
    same_tokens = [name for name in PRE_TOKENIZERS
                   if _as_llama_cpp_would(backend, name).encode(CHECK_TEXT, add_special_tokens=False).ids == ids]
    same_pieces = [name for name in same_tokens
                   if _pieces(_as_llama_cpp_would(backend, name), CHECK_TEXT) == _pieces(backend, CHECK_TEXT)]
    known = KNOWN_TOKENIZER_HASHES.get(llama_cpp_tokenizer_hash(tokenizer))
    for name in ([known] if known in same_tokens else []) + same_pieces + same_tokens:
        return name
    raise ExportError(f"the tokenizer of {tokenizer.name_or_path} splits text unlike any pre-tokenizer the export job "
                      f"knows ({', '.join(PRE_TOKENIZERS)}): llama.cpp would tokenize prompts differently from training. "
                      "Convert this model with llama.cpp's convert_hf_to_gguf.py")


def _looks_special(text: str) -> bool:
    # As llama.cpp's converter: added tokens shaped like control tokens are control tokens whatever their flag says.
    return (text.startswith("<|") and text.endswith("|>")) or (text.startswith("<｜") and text.endswith("｜>"))


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int
    pad: int | None
    unk: int | None
    add_bos: bool
    add_eos: bool


def gguf_vocab(tokenizer, rows: int, end_id: int) -> Vocab:
    """The tokenizer as llama.cpp reads it, for an embedding of `rows` rows (ids without a token become unused
    padding entries, as in llama.cpp's converter); `end_id` is written as EOS, where llama.cpp stops."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(by_id) >= rows:
        raise ExportError(f"the tokenizer of {tokenizer.name_or_path} has token id {max(by_id)} but the model's "
                          f"embedding has {rows} rows; the folder is inconsistent, rerun the merge job")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        text = by_id[i]
        if i in added:
            special = added[i].special or _looks_special(text)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(text)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    plain = tokenizer("medcot", add_special_tokens=False)["input_ids"]
    full = tokenizer("medcot")["input_ids"]
    bos = tokenizer.bos_token_id
    add_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    add_eos = full[-1:] == [tokenizer.eos_token_id] and plain[-1:] != [tokenizer.eos_token_id]
    if full != [bos] * add_bos + plain + [tokenizer.eos_token_id] * add_eos:
        raise ExportError(f"the tokenizer of {tokenizer.name_or_path} adds tokens other than BOS and EOS around a text "
                          f"({full} for {plain}); llama.cpp cannot reproduce that")
    return Vocab(tokens, [int(t) for t in types], merges, pre_tokenizer_name(tokenizer), bos, end_id,
                 tokenizer.pad_token_id, tokenizer.unk_token_id, add_bos, add_eos)


# ---- prompts: the chat template in the GGUF, and Ollama's template ----------------------------------------------------

_PROBE = "MEDCOT-QUESTION-PROBE"


def _jinja_literal(text: str) -> str:
    # Escapes that both Jinja2 and llama.cpp's own Jinja engine read: backslash, quote and newline.
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def recipe_chat_template() -> str:
    """The recipe's prompt as a Jinja chat template: a user message becomes the recipe's prompt, an assistant message
    the text after `<think>` closed by EOS, as in training; the generation prompt is `<think>`."""
    before, after = inference_prompt(_PROBE).split(_PROBE)
    opening = after.removesuffix("<think>")
    return ("{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            f"{{{{ {_jinja_literal(before)} + message['content'] + {_jinja_literal(opening)} }}}}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{ '<think>' + message['content'] + eos_token }}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<think>' }}{%- endif -%}")


def gguf_chat_template(template: str, tokenizer) -> str:
    return tokenizer.chat_template if template == "chat" else recipe_chat_template()


def _go_text(text: str) -> str:
    # Go's text/template has no escape for "{{" in text: it is written as an action printing the string.
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(template: str, tokenizer, add_bos: bool) -> str:
    """The Modelfile's TEMPLATE: the serving prompt (medcot.prompts.serving_prompt) around `{{ .Prompt }}`, then
    `{{ .Response }}` and the end token, which Ollama renders for earlier turns and cuts for the last one.

    The BOS a rendered chat template starts with is left out where llama.cpp adds it (add_bos), as Ollama's own
    templates do: it would be there twice."""
    rendered = serving_prompt(template, tokenizer, _PROBE)
    if rendered.count(_PROBE) != 1 or serving_prompt(template, tokenizer, _PROBE + "2") != rendered.replace(_PROBE, _PROBE + "2"):
        raise ExportError(f"the chat template of {tokenizer.name_or_path} changes the question it wraps, so Ollama's "
                          "{{ .Prompt }} cannot stand for it; serve the GGUF with llama-server, whose chat endpoint "
                          "applies the GGUF's own template")
    before, after = rendered.split(_PROBE)
    if add_bos and tokenizer.bos_token and before.startswith(tokenizer.bos_token):
        before = before[len(tokenizer.bos_token):]
    end = tokenizer.convert_ids_to_tokens(answer_end_id(template, tokenizer))
    return _go_text(before) + "{{ .Prompt }}" + _go_text(after) + "{{ .Response }}" + _go_text(end)


def end_tokens(folder: Path, tokenizer) -> list[str]:
    """The tokens generation stops on, as transformers reads them from the folder: the tokenizer's EOS and
    generation_config.json's eos_token_id."""
    ids = {tokenizer.eos_token_id}
    path = folder / "generation_config.json"
    if path.is_file():
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return [tokenizer.convert_ids_to_tokens(i) for i in sorted(i for i in ids if i is not None)]


def ollama_params(config: RunConfig, stops: list[str]) -> dict[str, Any]:
    """Ollama's parameters: its stop list, and the evaluate job's decoding (greedy unless eval.do_sample; Ollama's
    default repeat penalty of 1.1 would change greedy answers)."""
    return {"stop": stops, "temperature": config.eval.temperature if config.eval.do_sample else 0,
            "repeat_penalty": 1}


def modelfile(gguf_name: str, template_text: str, params: dict[str, Any], header: str) -> str:
    if '"""' in template_text or any('"' in s for s in params["stop"]):
        raise ExportError('the prompt template or a stop token holds a double quote, which a Modelfile cannot quote')
    lines = [f"# {header}", f"FROM ./{gguf_name}", f'TEMPLATE """{template_text}"""']
    lines += [f'PARAMETER stop "{s}"' for s in params["stop"]]
    lines += [f"PARAMETER {k} {v}" for k, v in params.items() if k != "stop"]
    return "\n".join(lines) + "\n"


# ---- writing a GGUF file ----------------------------------------------------------------------------------------

def _add_metadata(writer: gguf.GGUFWriter, config, vocab: Vocab, chat_template: str, file_type: LlamaFileType,
                  name: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope(config).get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(_head_dim(config))
    if getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads):
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos is not None:
        writer.add_bos_token_id(vocab.bos)
    writer.add_eos_token_id(vocab.eos)
    if vocab.pad is not None:
        writer.add_pad_token_id(vocab.pad)
    if vocab.unk is not None:
        writer.add_unk_token_id(vocab.unk)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_chat_template(chat_template)


def _convert(source_fd: dict[Path, int], tensor: PlannedTensor, first: int, last: int) -> np.ndarray:
    if tensor.values is not None:
        rows = tensor.values.reshape(-1, tensor.shape[-1])[first:last]
    else:
        rows = _read_rows(source_fd[tensor.source.file], tensor.source, first, last)
        if tensor.rotary_heads:
            rows = rotary_permute(rows, (last - first) * tensor.rotary_heads // tensor.rows)
    return gguf.quants.quantize(rows, tensor.qtype)


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(data)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


@dataclass(frozen=True)
class GgufModel:
    """What a GGUF file of the folder needs besides its type: the config, tensors and tokenizer, read once."""
    folder: Path
    config: Any
    tokenizer: Any
    sources: dict[str, SourceTensor]
    vocab: Vocab
    chat_template: str

    @classmethod
    def read(cls, folder: Path, template: str) -> GgufModel:
        config = AutoConfig.from_pretrained(str(folder))
        check_architecture(config, folder)
        tokenizer = load_tokenizer(str(folder))
        end = answer_end_id(template, tokenizer)
        if end != tokenizer.eos_token_id:
            raise ExportError(f"the tokenizer of {folder} ends with {tokenizer.eos_token!r}, not the token training ended "
                              f"answers with ({tokenizer.convert_ids_to_tokens(end)!r}); rerun the merge job, which "
                              "writes it (make merge ARGS=--force)")
        return cls(folder, config, tokenizer, safetensors_index(folder), gguf_vocab(tokenizer, config.vocab_size, end),
                   gguf_chat_template(template, tokenizer))

    def plan(self, type_name: str) -> list[PlannedTensor]:
        return plan_tensors(self.config, self.sources, TYPES[type_name][0])

    def estimated_bytes(self, type_name: str) -> int:
        """The file's size, or a little over: the tensors, padded to 32 bytes, and the header, whose bulk is the
        vocabulary and the merges (a string is stored as its length in 8 bytes and its UTF-8 bytes)."""
        tensors = self.plan(type_name)
        strings = [*self.vocab.tokens, *self.vocab.merges, self.chat_template, *(t.name for t in tensors)]
        header = (64 << 10) + sum(8 + len(s.encode()) for s in strings) + 4 * len(self.vocab.types) + 48 * len(tensors)
        return header + sum(gguf.GGUFWriter.ggml_pad(t.nbytes, gguf.GGUF_DEFAULT_ALIGNMENT) for t in tensors)


def write_gguf(model: GgufModel, type_name: str, path: Path, *, workers: int, name: str) -> dict[str, Any]:
    """Write `model` as a GGUF file of type `type_name` at `path`; returns its size, time and tensor count.

    gguf-py's writer lays out the header, the metadata and the tensor table (names, shapes, types, offsets); the
    tensor data then goes to those offsets block by block from `workers` threads (numpy releases the GIL in the
    quantizer's array operations), at most two blocks per thread in flight."""
    qtype, file_type, _ = TYPES[type_name]
    tensors = model.plan(type_name)
    started = time.monotonic()
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_metadata(writer, model.config, model.vocab, model.chat_template, file_type, name)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    data_start = gguf.GGUFWriter.ggml_pad(writer.fout[0].tell(), writer.data_alignment)
    writer.close()
    offsets, end = [], data_start
    for t in tensors:
        offsets.append(end)
        end += gguf.GGUFWriter.ggml_pad(t.nbytes, writer.data_alignment)
    os.truncate(path, end)  # the padding between tensors reads as zeros, as gguf-py writes it

    source_bytes = sum(t.source.row_bytes * t.rows for t in tensors if t.source is not None)
    progress = Progress(f"export {type_name}", max(1, source_bytes >> 20), "MiB")
    files = {t.source.file for t in tensors if t.source is not None}
    source_fd = {f: os.open(f, os.O_RDONLY) for f in files}
    out_fd = os.open(path, os.O_WRONLY)
    try:
        def convert_block(t: PlannedTensor, offset: int, first: int, last: int) -> int:
            _pwrite_all(out_fd, _convert(source_fd, t, first, last), offset + first * t.row_bytes)
            return (last - first) * t.source.row_bytes if t.source is not None else 0

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gguf") as pool:
            pending: set[Future[int]] = set()
            done_bytes = 0

            def settle(futures: set[Future[int]]) -> None:
                nonlocal done_bytes
                for future in futures:
                    done_bytes += future.result()
                rate = done_bytes / 2**20 / max(time.monotonic() - started, 1e-3)
                progress.update((done_bytes >> 20) - progress.done, f"{rate:.0f} MiB/s of weights read")

            for t, offset in zip(tensors, offsets, strict=True):
                for first, last in t.blocks():
                    if len(pending) >= 2 * workers:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        settle(finished)
                    pending.add(pool.submit(convert_block, t, offset, first, last))
            settle(set(pending))
        os.fsync(out_fd)
    finally:
        os.close(out_fd)
        for fd in source_fd.values():
            os.close(fd)
        progress.close()
    seconds = time.monotonic() - started
    size = path.stat().st_size
    log.info("export: %s, %d tensors, %.2f GB in %.1f s (%.0f MB/s of weights read)", path.name, len(tensors),
             size / 1e9, seconds, source_bytes / 1e6 / max(seconds, 1e-3))
    return {"file": path.name, "type": type_name, "bytes": size, "seconds": round(seconds, 2), "tensors": len(tensors)}


def worker_count(setting: int | str) -> int:
    if setting != "auto":
        return int(setting)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def gguf_file_name(run_name: str, type_name: str) -> str:
    """`<run>-Q8_0.gguf`: the quantization in the name, where the Hub and Ollama's `hf.co/<repo>:Q8_0` look for it."""
    return f"{run_name}-{TYPES[type_name][2]}.gguf"


# ---- the stage ------------------------------------------------------------------------------------------------------

def stage_hash(config: RunConfig) -> str:
    """The export's identity: the types written and the prompt template served (not the thread count, which changes no
    byte), plus the decoding the Modelfile sets."""
    payload = {"types": config.export.types, "template": config.data.template,
               "decoding": [config.eval.do_sample, config.eval.temperature]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _check_disk(run: RunDir, needed: int) -> None:
    free = free_bytes(run.root)
    if free is not None and free < needed + LOW_DISK_BYTES:
        raise ResourceError(f"export: {run.root} has {free / 1e9:.1f} GB free but the GGUF files need about "
                            f"{needed / 1e9:.1f} GB; free some space, set output_dir to a larger disk, or write fewer "
                            "types (export.types=[q8_0])")


def export_stage(config: RunConfig, force: bool = False) -> int:
    started = time.monotonic()
    run = RunDir(config.run_dir)
    merge = run.require("merge", needed_by="export")
    inputs = {"merge": merge.identity()}
    config_hash = stage_hash(config)
    if run.check_done(STAGE, config_hash, inputs, force):
        log.info("export: already finished in %s with this merged model; nothing to do (delete the stage folder to redo "
                 "it)", run.stage(STAGE))
        return 0
    folder = run.stage("merge") / "model"
    template = config.data.template
    model = GgufModel.read(folder, template)
    _check_disk(run, sum(model.estimated_bytes(t) for t in config.export.types))
    workers = worker_count(config.export.workers)
    log.info("export: %s as %s, %d threads; pre-tokenizer %s, end token %r, BOS %s", folder,
             ", ".join(config.export.types), workers, model.vocab.pre, model.vocab.tokens[model.vocab.eos],
             "added" if model.vocab.add_bos else "not added")
    stops = end_tokens(folder, model.tokenizer)
    params = ollama_params(config, stops)
    template_text = ollama_template(template, model.tokenizer, model.vocab.add_bos)
    with run.publishing(STAGE, config_hash, inputs, started=started) as (tmp, manifest):
        files = [write_gguf(model, t, tmp / gguf_file_name(config.run_name, t), workers=workers, name=config.run_name)
                 for t in config.export.types]
        header = (f"Ollama Modelfile of {config.run_name} (data.template: {template}), written by medcot's export job: "
                  f"ollama create {config.run_name} -f Modelfile")
        (tmp / MODELFILE).write_text(modelfile(files[0]["file"], template_text, params, header), encoding="utf-8")
        (tmp / OLLAMA_TEMPLATE).write_text(template_text, encoding="utf-8")
        (tmp / OLLAMA_PARAMS).write_text(json.dumps(params, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        save_config(config, tmp / "config.yaml")
        manifest.extra = {"files": files, "ollama_files": [MODELFILE, OLLAMA_TEMPLATE, OLLAMA_PARAMS],
                          "pre_tokenizer": model.vocab.pre, "stop": stops, "workers": workers}
    log.info("export: done; %s in %s (ollama create %s -f %s)", ", ".join(f["file"] for f in files), run.stage(STAGE),
             config.run_name, run.stage(STAGE) / MODELFILE)
    return 0
