"""The recipe's prompt templates, verbatim, and the parsing of what a model writes back."""

from __future__ import annotations

from dataclasses import dataclass

# Verbatim from the reference recipe; tests compare them byte for byte. Training text is built from
# these, not from the model's chat template: R1-Distill's template strips everything before `</think>`
# from assistant turns, which would delete the chain of thought we train on.
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
