"""The export job's GGUF files in llama.cpp itself (llama-cpp-python, which `make test` builds once and installs): how it
tokenizes the evaluate job's prompts, where the Modelfile's prompt lands, its greedy answers and where they stop, and
its held-out perplexity, against transformers on the same merged folder.

Greedy answers are compared without running transformers' generate: transformers' argmax at every position of
llama.cpp's answer (one forward pass over prompt and answer) equals llama.cpp's next token exactly when transformers'
greedy decoding would have written the same tokens, its end token included.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from medcot.config import load_config
from medcot.data import prepare, tokenize_example
from medcot.evaluate import eval_items, heldout_token_losses
from medcot.export import GgufModel, end_tokens, export_stage, ollama_template, write_gguf
from medcot.merge import merge_stage
from medcot.modeling import select_backend
from medcot.prompts import answer_end_id, serving_prompt
from medcot.training import train_stage

from conftest import (
    MCQ_SAMPLE,
    ROOT,
    SAMPLE,
    build_tiny_llama,
    build_tiny_llama3,
    llama3_vocab,
    llama_cpp_source,
    ollama_fill,
)

sys.path.insert(0, str(ROOT))  # bench/ is a package of the repository, not an installed one
from bench.llama_load_check import load_in_child  # noqa: E402

pytestmark = pytest.mark.llamacpp

ANSWER_TOKENS = 32  # the greedy tokens compared
THREADS = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: `make test` builds and installs it "
                    "(bash tests/llama_cpp_wheel.sh .venv/bin/python)")
    return llama_cpp


def load(llama_cpp, path: Path, **kwargs):
    loads_in_a_child(path, kwargs.get("vocab_only", False))
    return llama_cpp.Llama(str(path), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS, verbose=False, **kwargs)


@functools.cache
def loads_in_a_child(path: Path, vocab_only: bool) -> None:
    """Each file is first loaded in a child process: a llama.cpp build that crashes on it fails this test with the
    signal and llama.cpp's last log lines instead of killing the whole test run. One did, on one Intel machine:
    llama-cpp-python 0.3.36 built there died (SIGSEGV) in std::regex compiling the SmolLM2 vocabulary's pre-tokenizer,
    whatever the instruction set or locale, while llama.cpp's own llama-tokenize read the same file there, and a stock
    Ubuntu 24.04 build of llama-cpp-python reads it (docs/gguf.md)."""
    rc, log = load_in_child(path, what="vocab" if vocab_only else "model")
    if rc < 0:
        tail = "\n".join(log.splitlines()[-8:])
        pytest.fail(f"llama-cpp-python crashed ({signal.Signals(-rc).name}) loading {path.name}"
                    f"{' (vocabulary only)' if vocab_only else ''}; its last lines:\n{tail}")


def llama_tokens(llm, text: str, add_special: bool) -> list[int]:
    """How llama.cpp reads a text: special tokens parsed, BOS added where the file says (add_special), as
    llama-server and Ollama read a rendered prompt."""
    return llm.tokenize(text.encode(), add_bos=add_special, special=True)


def llama_greedy(llama_cpp, llm, prompt: list[int], limit: int) -> list[int]:
    """llama.cpp's greedy answer: its sampler at temperature 0, until an end-of-generation token (kept) or `limit`."""
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(token)
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(out) >= limit:
            break
    return out


@torch.no_grad()
def transformers_agrees(model, prompt: list[int], answer: list[int]) -> int:
    """How many leading tokens of `answer` transformers' greedy decoding writes after `prompt`."""
    logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1:-1]
    same = (logits.argmax(-1) == torch.tensor(answer)).tolist()
    return next((i for i, s in enumerate(same) if not s), len(answer))


def hf_prompt_tokens(tokenizer, template: str, prompt: str) -> list[int]:
    # As the evaluate job: a rendered chat template holds its own BOS.
    return tokenizer(prompt, add_special_tokens=template != "chat")["input_ids"]


def evaluate_prompts(config, tokenizer, template: str) -> list[str]:
    items = eval_items(config, prepare(config.data, tokenizer, config.model.max_seq_length).heldout)
    chosen = items[:7] + [i for i in items if i.source == "showcase"] + [i for i in items if i.source.startswith("mcq")][:2]
    assert len(chosen) == 10
    return [serving_prompt(template, tokenizer, item.question) for item in chosen]


# ---- models ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny Llama with grouped-query attention and an untied output, trained and merged in float16 (the merge
    job's default), exported as f16 and q8_0."""
    tmp = tmp_path_factory.mktemp("llamacpp-tiny")
    config = load_config(None, [
        f"model.name={build_tiny_llama(tmp / 'base')}", "model.max_seq_length=1024", f"data.path={SAMPLE}",
        "data.train_rows=16", "data.heldout_rows=7", f"output_dir={tmp / 'out'}", "run_name=tiny",
        "lora.use_gradient_checkpointing=false", "training.max_steps=2", "training.warmup_steps=0",
        "training.optim=adamw_torch", "training.learning_rate=1e-3", "tracking.report_to=none",
        f"eval.mcq=[{{path: {MCQ_SAMPLE}, limit: 2}}]", "export.types=[f16,q8_0]"])
    runtime = select_backend(config.model)
    train_stage(config, runtime)
    merge_stage(config, runtime)
    export_stage(config)
    return config


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """A tiny Llama over DeepSeek-R1-Distill-Llama's tokenizer (Llama 3's vocabulary, from llama.cpp's copy), exported
    for both templates; and the vocabulary's test texts with Meta's token ids."""
    tmp = tmp_path_factory.mktemp("llamacpp-llama3")
    vocab, texts, ids = llama3_vocab(tmp)
    folder = build_tiny_llama3(tmp / "model", vocab)
    files = {}
    for template in ("recipe", "chat"):
        model = GgufModel.read(folder, template)
        write_gguf(model, "f16", tmp / f"{template}.gguf", workers=THREADS, name=template)
        files[template] = (model, tmp / f"{template}.gguf")
    return folder, files, texts, ids


def trained_demo(output_dir: Path, steps: int = 24, run_name: str = "demo"):
    """The demo's SmolLM2-135M trained as configs/demo.yaml says, for `steps` steps, merged, exported as f16 and q8_0
    under `output_dir` (each stage skips when its output is there). bench/gguf_agreement.py builds its models here."""
    config = load_config(ROOT / "configs" / "demo.yaml", [f"output_dir={output_dir}", f"run_name={run_name}",
                                                           f"training.max_steps={steps}", "export.types=[f16,q8_0]"])
    runtime = select_backend(config.model)
    train_stage(config, runtime)
    merge_stage(config, runtime)
    export_stage(config)
    return config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model after 24 steps: the agreement figures below were measured on that model."""
    return trained_demo(tmp_path_factory.mktemp("llamacpp-demo"))


def gguf_file(config, type_name: str) -> Path:
    return config.run_dir / "export" / f"{config.run_name}-{type_name.upper()}.gguf"


def merged(config) -> Path:
    return config.run_dir / "merge" / "model"


# ---- tokens -----------------------------------------------------------------------------------------------------------

def test_llama3_tokenizer_rebuilt_from_llama_cpps_copy_is_meta_llama3s(llama3):
    """The Llama 3 tokenizer these tests use gives Meta's token ids on llama.cpp's tokenizer test texts, and the
    hash by which llama.cpp's converter recognises Meta-Llama-3-8B's tokenizer."""
    from transformers import AutoTokenizer

    from medcot.export import KNOWN_TOKENIZER_HASHES, llama_cpp_tokenizer_hash

    folder, _, texts, ids = llama3
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts] == ids and len(texts) == 46
    assert KNOWN_TOKENIZER_HASHES[llama_cpp_tokenizer_hash(tokenizer)] == "llama-bpe"


def test_llama_cpp_reads_llama3s_test_texts_from_the_exported_file_as_meta_did(llama_cpp, llama3):
    _, files, texts, ids = llama3
    llm = load(llama_cpp, files["chat"][1], vocab_only=True)
    assert [llama_tokens(llm, t, add_special=False) for t in texts] == ids


@pytest.mark.parametrize("case", ["tiny-recipe", "llama3-recipe", "llama3-chat",
                                  pytest.param("demo-recipe", marks=pytest.mark.slow),
                                  pytest.param("demo-chat", marks=pytest.mark.slow)])
def test_llama_cpp_reads_the_evaluate_jobs_prompts_token_for_token_as_transformers(llama_cpp, request, case):
    """A wrong pre-tokenizer name, a missing BOS or a special token read as text shows here."""
    from transformers import AutoTokenizer

    name, template = case.split("-")
    if name == "llama3":
        folder, files, _, _ = request.getfixturevalue("llama3")
        path, config = files[template][1], request.getfixturevalue("tiny")
    else:
        config = request.getfixturevalue(name)
        folder, path = merged(config), gguf_file(config, "f16")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = load(llama_cpp, path, vocab_only=True)
    for prompt in evaluate_prompts(config, tokenizer, template):
        expected = hf_prompt_tokens(tokenizer, template, prompt)
        assert llama_tokens(llm, prompt, add_special=template != "chat") == expected, prompt[-80:]


@pytest.mark.parametrize("case", ["tiny", "llama3-chat", pytest.param("demo", marks=pytest.mark.slow)])
def test_modelfile_prompt_reaches_llama_cpp_as_the_evaluate_jobs_tokens(llama_cpp, request, case):
    """Ollama fills the Modelfile's TEMPLATE and hands the text to llama.cpp, which adds BOS where the file says."""
    from transformers import AutoTokenizer

    if case == "llama3-chat":
        folder, files, _, _ = request.getfixturevalue("llama3")
        model, path = files["chat"]
        config, template = request.getfixturevalue("tiny"), "chat"
        template_text = ollama_template("chat", model.tokenizer, model.vocab.add_bos)
    else:
        config = request.getfixturevalue(case)
        folder, path, template = merged(config), gguf_file(config, "q8_0"), config.data.template
        template_text = (config.run_dir / "export" / "template").read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = load(llama_cpp, path, vocab_only=True)
    items = eval_items(config, prepare(config.data, tokenizer, config.model.max_seq_length).heldout)
    chosen = items[:7] + [i for i in items if i.source == "showcase"] + [i for i in items if i.source.startswith("mcq")][:2]
    for item in chosen:
        expected = hf_prompt_tokens(tokenizer, template, serving_prompt(template, tokenizer, item.question))
        assert llama_tokens(llm, ollama_fill(template_text, item.question), add_special=True) == expected


@pytest.mark.parametrize("template", ["recipe", "chat"])
def test_chat_template_in_the_file_gives_llama_cpp_pythons_chat_endpoint_the_serving_prompt(llama_cpp, llama3, template):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    _, files, _, _ = llama3
    model, path = files[template]
    metadata = load(llama_cpp, path, vocab_only=True).metadata
    formatter = Jinja2ChatFormatter(template=metadata["tokenizer.chat_template"], eos_token=model.tokenizer.eos_token,
                                    bos_token=model.tokenizer.bos_token)
    question = "A 61-year-old woman leaks urine when she coughs. What would cystometry show?"
    prompt = formatter(messages=[{"role": "user", "content": question}]).prompt
    assert prompt == serving_prompt(template, model.tokenizer, question)


def crashing_llama_cpp(folder: Path) -> Path:
    """A `llama_cpp` package whose Llama dies of SIGSEGV after a log line, as the crashing build did."""
    (folder / "llama_cpp").mkdir(parents=True)
    (folder / "llama_cpp" / "__init__.py").write_text(
        "import os, signal, sys\n"
        "class Llama:\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        print('init_tokenizer: initializing tokenizer for type 2', file=sys.stderr, flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGSEGV)\n")
    return folder


def test_a_llama_cpp_crash_fails_the_test_that_loads_the_file_not_the_whole_run(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(crashing_llama_cpp(tmp_path / "build")))
    with pytest.raises(pytest.fail.Exception, match=r"crashed \(SIGSEGV\) loading tiny-Q8_0.gguf \(vocabulary only\)"
                       r"(.|\n)*initializing tokenizer"):
        loads_in_a_child.__wrapped__(gguf_file(tiny, "q8_0"), True)


def test_load_check_reads_the_files_metadata_and_reports_a_crash_with_its_signal(llama_cpp, tiny, tmp_path):
    path = gguf_file(tiny, "q8_0")
    script = [sys.executable, str(ROOT / "bench" / "llama_load_check.py"), "--vocab-only", str(path)]
    done = subprocess.run([*script, "--metadata", str(tmp_path / "meta.json")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines()] == ["ok", "ok"]  # plain, then with torch loaded
    meta = json.loads((tmp_path / "meta.json").read_text())[path.name]
    reader = gguf.GGUFReader(path)
    assert meta["fields"]["tokenizer.ggml.tokens"]["count"] == len(reader.fields["tokenizer.ggml.tokens"].data)
    assert meta["fields"]["tokenizer.ggml.pre"]["value"] == reader.fields["tokenizer.ggml.pre"].contents()
    assert meta["tensors"].keys() == {t.name for t in reader.tensors}
    crashed = subprocess.run([*script, "--build", str(crashing_llama_cpp(tmp_path / "build"))], capture_output=True,
                             text=True, timeout=300)
    assert crashed.returncode == 1
    assert crashed.stdout.count("CRASHED tiny-Q8_0.gguf") == 2 and "signal SIGSEGV" in crashed.stdout
    assert "initializing tokenizer for type 2" in crashed.stdout


def regex_library_wheel(folder: Path, *flags: str) -> Path:
    """A wheel whose llama_cpp/lib/libllama.so compiles a std::regex, built by this machine's g++ with `flags`."""
    folder.mkdir(parents=True)
    (folder / "regex.cpp").write_text('#include <regex>\n'
                                      'extern "C" bool splits(const char *text) {\n'
                                      '    return std::regex_search(text, std::regex("[a-zA-Z]+|[0-9]{1,3}|\\\\s+"));\n'
                                      '}\n')
    subprocess.run(["g++", "-shared", "-fPIC", *flags, str(folder / "regex.cpp"), "-o", str(folder / "libllama.so")],
                   check=True)
    wheel = folder / "llama_cpp_python-0.0-py3-none-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(folder / "libllama.so", "llama_cpp/lib/libllama.so")
    return wheel


@pytest.mark.parametrize("flags", [(), ("-static-libstdc++",)], ids=["shared", "static"])
def test_a_wheel_whose_llama_cpp_carries_its_own_cpp_runtime_is_refused_with_the_compiler_to_change(tmp_path, flags):
    wheel = regex_library_wheel(tmp_path / "lib", *flags)
    done = subprocess.run(["bash", str(ROOT / "tests" / "llama_cpp_linkage.sh"), str(wheel)], capture_output=True,
                          text=True, env={**os.environ, "CXX": "/opt/gcc/bin/g++"}, timeout=60)
    if not flags:
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 1
    assert "links the C++ runtime into llama.cpp statically (compiler: /opt/gcc/bin/g++)" in done.stderr
    assert "CC=gcc CXX=g++ make test" in done.stderr


def test_the_llama_cpp_that_the_tests_load_links_the_systems_cpp_runtime(llama_cpp):
    done = subprocess.run(["ldd", str(Path(llama_cpp.__file__).parent / "lib" / "libllama.so")], capture_output=True,
                          text=True, timeout=60)
    assert "libstdc++.so" in done.stdout, done.stdout


def test_crash_probe_loads_a_vocabulary_from_c_and_from_python_every_way(llama_cpp, tiny, tmp_path):
    vocab = tmp_path / "vocab.gguf"
    probe = [sys.executable, str(ROOT / "bench" / "llama_crash_probe.py")]
    subprocess.run([*probe, "--vocab-of", str(merged(tiny)), str(vocab)], check=True, timeout=300)
    assert gguf.GGUFReader(vocab).fields["tokenizer.ggml.pre"].contents() == \
        gguf.GGUFReader(gguf_file(tiny, "q8_0")).fields["tokenizer.ggml.pre"].contents()
    done = subprocess.run([*probe, str(vocab), str(llama_cpp_source())], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    blocks = re.findall(r"^(C driver|Python)[^\n]*: exit (-?\d+)\n((?:    .*\n?)*)", done.stdout, re.MULTILINE)
    assert len(blocks) == 10 and {exit for _, exit, _ in blocks} == {"0"}, done.stdout
    tokens = {re.search(r"^    (tokens:.*)$", text, re.MULTILINE).group(1) for _, _, text in blocks}
    assert len(tokens) == 1 and tokens != {"tokens:"}, tokens  # the same tokens every way


def test_the_files_end_token_is_the_trained_one_and_llama_cpp_stops_on_every_end_token(llama_cpp, tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged(tiny))
    llm = load(llama_cpp, gguf_file(tiny, "q8_0"), vocab_only=True)
    assert llm.token_eos() == answer_end_id("recipe", tokenizer)
    for token in end_tokens(merged(tiny), tokenizer):
        assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, tokenizer.convert_tokens_to_ids(token))


# ---- weights ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["tiny", pytest.param("demo", marks=pytest.mark.slow)])
def test_q8_0_file_holds_what_llama_cpps_own_quantizer_makes_of_the_f16_file(llama_cpp, request, tmp_path, case):
    """llama-quantize's Q8_0 of our f16 file, tensor by tensor, byte for byte (llama_model_quantize is its code)."""
    import ctypes

    config = request.getfixturevalue(case)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = THREADS
    out = tmp_path / "llama-quantize.gguf"
    assert llama_cpp.llama_model_quantize(str(gguf_file(config, "f16")).encode(), str(out).encode(), ctypes.byref(params)) == 0
    ours = {t.name: t for t in gguf.GGUFReader(gguf_file(config, "q8_0")).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert ours.keys() == theirs.keys()
    for name, t in ours.items():
        assert t.tensor_type == theirs[name].tensor_type and np.array_equal(t.data, theirs[name].data), name


def transformers_model(folder: Path):
    from transformers import AutoModelForCausalLM

    # float32 on the merged float16 weights: exactly the file's f16 weights, computed without rounding.
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_tiny_model_f16_greedy_answers_agree_with_transformers_on_9_of_10_prompts(llama_cpp, tiny):
    """The file holds the merged float16 weights exactly; what differs is llama.cpp's arithmetic (activations rounded
    to float16 before its matrix products), about 0.1% of the logits' spread, below most of this random model's
    greedy margins (0.1-10% of the spread): agreement here says the network is the same, a wrong rotary order or
    head mapping breaks it at the first token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged(tiny))
    model = transformers_model(merged(tiny))
    llm = load(llama_cpp, gguf_file(tiny, "f16"))
    agree = 0
    for prompt in evaluate_prompts(tiny, tokenizer, "recipe"):
        ids = tokenizer(prompt)["input_ids"]
        answer = llama_greedy(llama_cpp, llm, ids, ANSWER_TOKENS)
        agree += transformers_agrees(model, ids, answer) == len(answer) == ANSWER_TOKENS
    assert agree >= 9


def test_tiny_model_q8_0_logits_are_transformers_on_the_files_own_weights(llama_cpp, tiny):
    """q8_0 rounds each weight (and llama.cpp its activations to 8 bits) by more than this random model's greedy
    margins, so greedy agreement would measure luck; instead transformers runs the weights dequantized from the file
    (the rotary order undone), and llama.cpp's logits must match them to 5% of their spread (measured: about 3%)."""
    from transformers import AutoTokenizer

    from medcot.export import rotary_permute

    tokenizer = AutoTokenizer.from_pretrained(merged(tiny))
    model = transformers_model(merged(tiny))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    by_gguf = {names.get_name(k, try_suffixes=(".weight",)): v for k, v in model.state_dict().items()}
    for t in gguf.GGUFReader(gguf_file(tiny, "q8_0")).tensors:
        weights = gguf.quants.dequantize(t.data, t.tensor_type).reshape(by_gguf[t.name].shape)
        heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}.get(
            t.name.split(".")[-2])
        if heads:  # back to transformers' row order
            weights = weights[np.argsort(rotary_permute(np.arange(weights.shape[0]), heads))]
        by_gguf[t.name].copy_(torch.from_numpy(np.array(weights)))
    llm = load(llama_cpp, gguf_file(tiny, "q8_0"), logits_all=True)
    for prompt in evaluate_prompts(tiny, tokenizer, "recipe"):
        ids = tokenizer(prompt)["input_ids"]
        llm.reset()
        llm.eval(ids)
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].numpy()
        spread = expected.std(axis=1, keepdims=True)
        assert (np.abs(np.asarray(llm.scores[:len(ids)]) - expected) / spread).max() < 0.05


def demo_answers(llama_cpp, demo, type_name: str, limit: int) -> list[tuple[int, int, bool]]:
    """Per prompt: (tokens llama.cpp answered, how many transformers agrees with, whether it ended on the end token)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged(demo))
    model = transformers_model(merged(demo))
    llm = load(llama_cpp, gguf_file(demo, type_name))
    prompts = [tokenizer(prompt)["input_ids"] for prompt in evaluate_prompts(demo, tokenizer, "recipe")]
    return llama_answers_agreed(llama_cpp, llm, model, prompts, answer_end_id("recipe", tokenizer), limit)


def llama_answers_agreed(llama_cpp, llm, model, prompts: list[list[int]], end: int,
                         limit: int) -> list[tuple[int, int, bool]]:
    """Per prompt: (tokens of llama.cpp's greedy answer, how many transformers `model` agrees with, whether it ended on
    `end`). bench/q8_0_rounding.py counts its answers with it too."""
    out = []
    for ids in prompts:
        answer = llama_greedy(llama_cpp, llm, ids, limit)
        out.append((len(answer), transformers_agrees(model, ids, answer), answer[-1] == end))
    return out


@pytest.mark.slow
def test_demo_model_f16_answers_agree_with_transformers_and_stop_where_it_stops(llama_cpp, demo):
    """Up to the demo's answer budget (eval.max_new_tokens, 256): transformers' greedy decoding writes llama.cpp's first
    32 tokens on at least 9 of 10 prompts (measured 10 on the model trained in fp32, 9 in bf16; whole answers: 8 and
    9), and wherever it writes an answer up to llama.cpp's trained end token, it stops on that token too (measured on
    5 and 6 answers)."""
    answers = demo_answers(llama_cpp, demo, "f16", demo.eval.max_new_tokens)
    print(f"f16 answers (tokens, agreed, ended): {answers}")
    assert sum(agreed >= min(n, ANSWER_TOKENS) for n, agreed, _ in answers) >= 9
    comparable = [(n, agreed) for n, agreed, ended in answers if ended and agreed >= n - 1]
    assert len(comparable) >= 4 and all(agreed == n for n, agreed in comparable)


@pytest.mark.slow
def test_demo_model_q8_0_answers_agree_with_transformers_on_their_first_32_tokens(llama_cpp, demo):
    """Measured 6 of 10 on AMD EPYC VMs, the model trained in fp32 and in bf16 (3 of 10 after 12 training steps
    instead of 24), and 5 of 10 on an Intel Xeon with AMX. q8_0 moves the logits of this 135M model by more than its
    greedy margins on some tokens: transformers itself on the Q8_0-rounded weights writes its own float32 answers on
    only 7 (AMD) or 8 (Intel) of 10 (bench/gguf_agreement.py), and llama.cpp also rounds the activations to 8 bits;
    the file is what llama.cpp's own quantizer writes, and its held-out perplexity is 0.5-0.7% above f16's (the tests
    above and below). On 60 questions (bench/q8_0_rounding.py) llama.cpp's q8_0 keeps 97.3% of transformers' greedy
    tokens, so 24 of 60 answers' first 32: these 10 sit above that rate; neither a SmoothQuant transform nor an offline
    Hadamard rotation of the model lifts it past 97.5%. The target, 7 of 10, is not reached; this bound catches a file
    that is wrong, not just rounded."""
    answers = demo_answers(llama_cpp, demo, "q8_0", ANSWER_TOKENS)
    print(f"q8_0 answers that agree with transformers: {answers}")
    assert sum(agreed == n and (n == ANSWER_TOKENS or ended) for n, agreed, ended in answers) >= 5


def llama_cpp_heldout_loss(llama_cpp, path: Path, rows: list[dict]) -> float:
    """Mean NLL per token of the reference reasoning, answer and end token given the prompt: the evaluate job's
    held-out loss, computed by llama.cpp."""
    llm = load(llama_cpp, path, logits_all=True)
    nll, count = 0.0, 0
    for row in rows:
        ids, scored = row["input_ids"], row["completion_mask"]
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
        logp = logits - logits.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        targets = [i for i in range(1, len(ids)) if scored[i]]
        nll -= sum(logp[i - 1, ids[i]] for i in targets)
        count += len(targets)
    return nll / count


@pytest.mark.slow
def test_demo_model_q8_0_heldout_perplexity_is_within_2_percent_of_f16(llama_cpp, demo):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged(demo))
    heldout = prepare(demo.data, tokenizer, demo.model.max_seq_length).heldout[:10]
    rows = [tokenize_example(example, tokenizer, "recipe") for example in heldout]
    f16 = llama_cpp_heldout_loss(llama_cpp, gguf_file(demo, "f16"), rows)
    q8_0 = llama_cpp_heldout_loss(llama_cpp, gguf_file(demo, "q8_0"), rows)
    sums = heldout_token_losses(transformers_model(merged(demo)), tokenizer, heldout, batch_size=4)
    transformers = sum(s for s, _ in sums) / sum(n for _, n in sums)
    print(f"held-out perplexity: transformers {math.exp(transformers):.3f}, llama.cpp f16 {math.exp(f16):.3f}, "
          f"q8_0 {math.exp(q8_0):.3f}")
    assert abs(math.exp(q8_0) / math.exp(f16) - 1) <= 0.02
    assert abs(math.exp(f16) / math.exp(transformers) - 1) <= 0.005  # the evaluate job's own number, by llama.cpp
