"""Prompts are the recipe's, byte for byte; generated text splits into reasoning and answer."""

from hypothesis import given
from hypothesis import strategies as st

from medcot.prompts import (
    INFERENCE_TEMPLATE,
    TRAIN_TEMPLATE,
    inference_prompt,
    mcq_question,
    parse_generation,
    split_training_text,
    training_text,
)

RECIPE_HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further context.\n"
    "Write a response that appropriately completes the request.\n"
    "Before answering, think carefully about the question and create a step-by-step chain of thoughts to ensure "
    "a logical and accurate response.\n"
    "### Instruction:\n"
    "You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, and treatment planning.\n"
    "Please answer the following medical question.\n"
    "### Question:\n"
    "{}\n"
    "### Response:\n"
)


def test_inference_template_is_the_recipes_byte_for_byte():
    assert INFERENCE_TEMPLATE == RECIPE_HEADER + "<think>{}"


def test_training_template_is_the_recipes_byte_for_byte():
    assert TRAIN_TEMPLATE == RECIPE_HEADER + "<think>\n{}\n</think>\n{}"


def test_inference_prompt_ends_inside_an_open_think_block():
    assert inference_prompt("Q?") == RECIPE_HEADER.format("Q?") + "<think>"


def test_training_text_appends_eos_after_the_response():
    text = training_text("Q?", "step one. step two.", "The answer.", "</s>")
    assert text == RECIPE_HEADER.format("Q?") + "<think>\nstep one. step two.\n</think>\nThe answer.</s>"


def test_prompt_completion_split_is_at_the_response_marker():
    prompt, completion = split_training_text("Q?", "cot", "ans", "<eos>")
    assert prompt.endswith("### Response:\n")
    assert completion == "<think>\ncot\n</think>\nans<eos>"


def test_mcq_question_lists_lettered_options():
    q = mcq_question("Which drug?", {"A": "Aspirin", "B": "Heparin"})
    assert q == "Which drug?\n\nA. Aspirin\nB. Heparin\n\nAnswer with the letter of the correct option."


def test_closed_think_block_splits_reasoning_and_answer():
    p = parse_generation("\nthe patient has X.\n</think>\nIt is X.")
    assert (p.reasoning, p.answer, p.think_closed, p.well_formed) == ("the patient has X.", "It is X.", True, True)


def test_unclosed_think_block_has_no_answer():
    p = parse_generation("thinking and thinking")
    assert (p.answer, p.think_closed, p.well_formed) == ("", False, False)


def test_closed_block_with_empty_answer_is_not_well_formed():
    p = parse_generation("reasoning</think>   ")
    assert p.think_closed and not p.well_formed


def test_reopened_think_tag_is_tolerated():
    p = parse_generation("<think>\nreason\n</think>\nanswer")
    assert (p.reasoning, p.answer) == ("reason", "answer")


text_without_tags = st.text(min_size=1).filter(lambda s: "</think>" not in s and "<think>" not in s)


@given(question=st.text(), cot=text_without_tags, response=text_without_tags)
def test_training_text_round_trips_through_the_parser(question, cot, response):
    _, completion = split_training_text(question, cot, response, "")
    parsed = parse_generation(completion[len("<think>"):])
    assert parsed.think_closed
    assert parsed.reasoning == cot.strip() and parsed.answer == response.strip()


@given(question=st.text())
def test_inference_prompt_holds_the_question_verbatim(question):
    prompt = inference_prompt(question)
    assert prompt.startswith(RECIPE_HEADER.split("{}")[0]) and f"### Question:\n{question}\n### Response:\n<think>" in prompt
