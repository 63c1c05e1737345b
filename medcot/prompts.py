"""The prompts a model trains on and answers: the recipe's templates, verbatim (`data.template: recipe`), or the
tokenizer's own chat template (`data.template: chat`, what a chat endpoint sends); and the parsing of what a model
writes back."""

from __future__ import annotations

from dataclasses import dataclass

# Verbatim from the reference recipe; tests compare them byte for byte. With `data.template: recipe` training text is
# built from these, not from the model's chat template.
_HEADER = """Below is an instruction that describes a task, paired with an input that provides further context.
Write a response that appropriately completes the request.
Before answering, think carefully about the question and create a step-by-step chain of thoughts to ensure a logical and accurate response.
### Instruction:
You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, and treatment planning.
Please answer the following medical question.
### Question:
{}
### Response:
"""

INFERENCE_TEMPLATE = _HEADER + "<think>{}"
TRAIN_TEMPLATE = _HEADER + "<think>\n{}\n</think>\n{}"

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
RESPONSE_MARKER = "### Response:"
# Strings that would confuse the template's structure if a row contained them.
TEMPLATE_MARKERS = ("### Instruction:", "### Question:", RESPONSE_MARKER, THINK_OPEN, THINK_CLOSE)


def inference_prompt(question: str) -> str:
    """The prompt a model answers; generation continues right after `<think>`."""
    return INFERENCE_TEMPLATE.format(question, "")


def split_training_text(question: str, cot: str, response: str, eos_token: str) -> tuple[str, str]:
    """(prompt, completion) whose concatenation is the recipe's training text plus EOS.

    The prompt ends right after `### Response:\\n`, so loss masking on the prompt covers the
    instruction and question, and the completion (`<think>...</think>` answer and EOS) is supervised.
    """
    # The prompt is the header alone: searching the text for the marker would cut inside a question that quotes it.
    prompt = _HEADER.format(question)
    return prompt, (TRAIN_TEMPLATE.format(question, cot, response) + eos_token)[len(prompt):]


def training_text(question: str, cot: str, response: str, eos_token: str) -> str:
    prompt, completion = split_training_text(question, cot, response, eos_token)
    return prompt + completion


class TemplateError(ValueError):
    """The tokenizer's chat template cannot serve as `data.template: chat`; the message says why and what to use."""


# Stands for an answer when the chat template renders a conversation, so that what follows it can be found.
_PROBE = "MEDCOT-ANSWER-PROBE"


def _require_chat_template(tokenizer) -> None:
    if not tokenizer.chat_template:
        raise TemplateError(f"data.template is chat, but the tokenizer of {tokenizer.name_or_path} has no chat template; "
                            "set data.template: recipe")


def chat_prompt(tokenizer, question: str) -> str:
    """What a chat endpoint (vLLM, TGI, Ollama) renders for one user message: the tokenizer's chat template with the
    assistant's turn opened. R1-Distill's ends with `<think>` and a newline."""
    _require_chat_template(tokenizer)
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)


def chat_turn_end(tokenizer) -> int:
    """The token with which the chat template closes an assistant turn: the one the model learns to end its answer
    with, and the one a server stops on."""
    _require_chat_template(tokenizer)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _PROBE}], tokenize=False)
    after = rendered.rpartition(_PROBE)[2] if _PROBE in rendered else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if not ids or ids[0] not in special:
        raise TemplateError(f"the chat template of {tokenizer.name_or_path} closes an assistant turn with {after!r}, "
                            "not a special token that generation could stop on; set data.template: recipe")
    return ids[0]


def split_chat_text(tokenizer, question: str, cot: str, response: str) -> tuple[str, str]:
    """(serving prompt, completion) of a training row under the chat template; the completion stops before the
    token that closes the turn (chat_turn_end), which is appended as a token.

    The completion is built, not rendered: R1-Distill's template strips everything before `</think>` from assistant
    turns, which would delete the chain of thought we train on. It is what the model writes after the serving prompt:
    the reasoning, `</think>` and the answer, with the `<think>` opening left out where the prompt already holds it.
    """
    prompt = chat_prompt(tokenizer, question)
    completion = f"{THINK_OPEN}\n{cot}\n{THINK_CLOSE}\n{response}"
    for opened in (THINK_OPEN + "\n", THINK_OPEN):
        if prompt.endswith(opened):
            return prompt, completion[len(opened):]
    return prompt, completion


def serving_prompt(template: str, tokenizer, question: str) -> str:
    """The prompt a model answers under `data.template` (recipe or chat)."""
    return chat_prompt(tokenizer, question) if template == "chat" else inference_prompt(question)


def answer_end_id(template: str, tokenizer) -> int:
    """The token a trained answer ends with: the chat template's end of turn, or the tokenizer's EOS for the recipe."""
    return chat_turn_end(tokenizer) if template == "chat" else tokenizer.eos_token_id


def mcq_question(stem: str, options: dict[str, str]) -> str:
    """A multiple-choice row as the question slot of the inference prompt: stem, lettered options, and
    what form the answer should take (so that a model that knows the answer can be scored)."""
    lines = [stem.strip(), ""] + [f"{letter}. {text}" for letter, text in options.items()]
    lines += ["", "Answer with the letter of the correct option."]
    return "\n".join(lines)


@dataclass(frozen=True)
class ParsedAnswer:
    reasoning: str
    answer: str
    think_closed: bool

    @property
    def well_formed(self) -> bool:
        """A closed think block followed by a non-empty answer."""
        return self.think_closed and bool(self.answer)


def parse_generation(text: str) -> ParsedAnswer:
    """Split generated text (what follows the prompt's `<think>`) into reasoning and final answer.

    Without a closing `</think>` everything is reasoning and the answer is empty: an answer that
    never left its think block is not an answer.
    """
    body = text
    if body.lstrip().startswith(THINK_OPEN):  # a model that re-opens the block it was given
        body = body.lstrip()[len(THINK_OPEN):]
    reasoning, sep, answer = body.partition(THINK_CLOSE)
    if not sep:
        return ParsedAnswer(reasoning=body.strip(), answer="", think_closed=False)
    return ParsedAnswer(reasoning=reasoning.strip(), answer=answer.strip(), think_closed=True)
