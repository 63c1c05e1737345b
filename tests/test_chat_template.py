"""data.template: chat trains on the prompt a chat endpoint sends: the training text begins, token for token, with
the serving prompt of the tokenizer's chat template, and ends with the token that closes the assistant's turn."""

import pytest
import torch
from transformers import AutoTokenizer

from medcot.config import load_config
from medcot.data import Example, prepare, tokenize_example
from medcot.evaluate import heldout_token_losses
from medcot.modeling import load_with_adapter, resolve_model_path, select_backend
from medcot.prompts import TemplateError, chat_turn_end, serving_prompt

from conftest import R1_EOS

EXAMPLE = Example("A 61-year-old woman leaks urine when she coughs. What does cystometry show?",
                  "Leakage on coughing without nocturnal symptoms points to stress incontinence.",
                  "Normal residual volume and no involuntary detrusor contractions.", row=0)


@pytest.fixture(scope="module", params=["demo", "r1"])
def chat_tokenizer(request, tiny_r1):
    """SmolLM2-135M-Instruct's tokenizer (ChatML) and one with R1-Distill's template, which opens the answer with
    `<think>` and a newline."""
    path = resolve_model_path("embedded:smollm2-135m-instruct") if request.param == "demo" else tiny_r1
    return AutoTokenizer.from_pretrained(path)


def server_prompt_ids(tokenizer, question: str) -> list[int]:
    """What a chat endpoint sends for one user message: the template rendered and tokenized by transformers."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)["input_ids"]


def test_training_text_begins_token_for_token_with_what_a_server_sends(chat_tokenizer):
    encoded = tokenize_example(EXAMPLE, chat_tokenizer, "chat")
    n_prompt = encoded["completion_mask"].index(1)
    assert encoded["input_ids"][:n_prompt] == server_prompt_ids(chat_tokenizer, EXAMPLE.question)
    assert encoded["completion_mask"] == [0] * n_prompt + [1] * (len(encoded["input_ids"]) - n_prompt)


def test_training_answer_ends_with_the_token_that_closes_the_assistants_turn(chat_tokenizer):
    encoded = tokenize_example(EXAMPLE, chat_tokenizer, "chat")
    closing = chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], tokenize=False).rpartition("A")[2]
    assert chat_tokenizer.convert_ids_to_tokens(encoded["input_ids"][-1]) == closing.strip()
    assert encoded["input_ids"][-1] == chat_turn_end(chat_tokenizer) == chat_tokenizer.eos_token_id


def test_r1_training_text_continues_the_think_block_that_the_prompt_opens(tiny_r1):
    tokenizer = AutoTokenizer.from_pretrained(tiny_r1)
    encoded = tokenize_example(EXAMPLE, tokenizer, "chat")
    n_prompt = encoded["completion_mask"].index(1)
    prompt = tokenizer.decode(encoded["input_ids"][:n_prompt])
    completion = tokenizer.decode(encoded["input_ids"][n_prompt:])
    assert prompt == f"<｜begin▁of▁sentence｜><｜User｜>{EXAMPLE.question}<｜Assistant｜><think>\n"
    assert completion == f"{EXAMPLE.cot}\n</think>\n{EXAMPLE.response}{R1_EOS}"


def test_demo_training_text_is_the_chat_templates_own_rendering_of_the_conversation():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("embedded:smollm2-135m-instruct"))
    answer = f"<think>\n{EXAMPLE.cot}\n</think>\n{EXAMPLE.response}"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": EXAMPLE.question},
                                              {"role": "assistant", "content": answer}], tokenize=False)
    assert tokenizer.decode(tokenize_example(EXAMPLE, tokenizer, "chat")["input_ids"]) + "\n" == rendered


def test_the_evaluate_job_asks_the_question_as_a_server_would(chat_tokenizer):
    prompt = serving_prompt("chat", chat_tokenizer, EXAMPLE.question)
    assert chat_tokenizer(prompt, add_special_tokens=False)["input_ids"] == server_prompt_ids(chat_tokenizer, EXAMPLE.question)


def test_chat_template_on_a_tokenizer_without_one_is_refused_with_the_setting_to_use(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(TemplateError, match="data.template is chat, but the tokenizer of .* has no chat template; "
                                            "set data.template: recipe"):
        tokenize_example(EXAMPLE, tokenizer, "chat")


def test_chat_heldout_loss_is_the_models_own_loss_on_the_answer_tokens(tiny_config, tiny_r1):
    config = load_config(None, tiny_config(f"model.name={tiny_r1}", "data.template=chat"))
    model, tokenizer = load_with_adapter(config, select_backend(config.model), None)
    example = prepare(config.data, tokenizer, config.model.max_seq_length).heldout[0]
    (total, count), = heldout_token_losses(model, tokenizer, [example], batch_size=1, template="chat")
    encoded = tokenize_example(example, tokenizer, "chat")
    ids = torch.tensor([encoded["input_ids"]])
    labels = ids.masked_fill(torch.tensor([encoded["completion_mask"]]) == 0, -100)
    with torch.no_grad():
        reference = model(input_ids=ids, labels=labels).loss.item()
    assert count == sum(encoded["completion_mask"]) and total / count == pytest.approx(reference, rel=1e-5)


def test_evaluate_job_with_the_chat_template_sends_each_question_as_a_server_would(tiny_config, tiny_r1):
    import json

    from medcot.evaluate import evaluate_stage

    config = load_config(None, tiny_config(f"model.name={tiny_r1}", "data.template=chat", "eval.heldout_limit=1"))
    assert evaluate_stage(config, select_backend(config.model), "before") == 0
    rows = [json.loads(line) for line in (config.run_dir / "eval-before" / "generations.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(tiny_r1)
    assert [r["prompt_tokens"] for r in rows] == [len(server_prompt_ids(tokenizer, r["question"])) for r in rows]
