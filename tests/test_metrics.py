import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from medcot.metrics import (
    bootstrap_ci,
    compare,
    format_table,
    parse_choice,
    rouge_l,
    summarize,
    token_weighted_loss,
    wilson_interval,
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def row(source="heldout", answer="x", think_closed=True, reasoning_tokens=10, answer_tokens=5, **kw):
    base = {"id": "q", "source": source, "question": "Q?", "reference": None, "options": None,
            "correct_choice": None, "reasoning": "r", "answer": answer, "raw": "r</think>" + answer,
            "prompt_tokens": 50, "reasoning_tokens": reasoning_tokens, "answer_tokens": answer_tokens,
            "generated_tokens": reasoning_tokens + answer_tokens, "think_closed": think_closed,
            "hit_token_limit": False}
    return base | kw


# ---------------------------------------------------------------------------------------- intervals

def test_wilson_interval_of_8_out_of_10_matches_published_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)


def test_wilson_interval_at_zero_and_all_successes_touches_the_bound():
    assert wilson_interval(0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    assert wilson_interval(10, 10) == (pytest.approx(0.7225, abs=1e-4), 1.0)


def test_wilson_interval_without_trials_is_the_whole_unit_interval():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_refuses_more_successes_than_trials():
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(11, 10)


@given(st.integers(1, 100_000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_interval_contains_the_proportion_inside_unit_interval(kn):
    k, n = kn
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_bootstrap_ci_is_deterministic_for_a_seed():
    values = [0.1, 0.9, 0.4, 0.7, 0.3, 0.8]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(values, seed=3) != bootstrap_ci(values, seed=4)


def test_bootstrap_ci_of_mean_brackets_the_mean_within_the_data_range():
    values = [1, 2, 3, 4, 5]
    lo, hi = bootstrap_ci(values)
    assert 1 <= lo < 3 < hi <= 5


def test_bootstrap_ci_of_median_uses_the_given_statistic():
    values = [1] * 9 + [100]  # the outlier moves the mean's interval, almost never the median's
    assert bootstrap_ci(values, np.median) == (1.0, 1.0)
    assert bootstrap_ci(values, np.mean)[1] > 10


def test_bootstrap_ci_of_one_value_is_that_value():
    assert bootstrap_ci([0.25]) == (0.25, 0.25)


def test_bootstrap_ci_refuses_no_values():
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


def test_heldout_loss_is_weighted_by_tokens_not_averaged_per_example():
    loss, _ = token_weighted_loss([(2.0, 1), (30.0, 10)])
    assert loss == pytest.approx(32 / 11)  # the per-example mean would be (2 + 3) / 2 = 2.5


def test_heldout_loss_skips_examples_without_tokens():
    assert token_weighted_loss([(5.0, 0), (6.0, 3)])[0] == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------ ROUGE-L

def test_rouge_l_of_known_strings():
    # LCS "the cat on the mat" = 5 of 6 tokens on each side.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)


def test_rouge_l_stems_words():
    # cats -> cat and running -> run; unstemmed the LCS would be 2 of 4.
    assert rouge_l("the cats are running", "the cat is run") == pytest.approx(0.75)


def test_rouge_l_is_one_for_identical_and_zero_for_disjoint_or_empty():
    assert rouge_l("Stress incontinence", "stress incontinence") == 1.0
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    assert rouge_l("", "gamma delta") == 0.0


# ------------------------------------------------------------------------------------ parse_choice

@pytest.mark.parametrize("text, expected", [
    ("B", "B"),
    ("(B)", "B"),
    ("B.", "B"),
    ("B)", "B"),
    ("Answer: B", "B"),
    ("Final Answer: **D**", "D"),
    ("**C**", "C"),
    ("Option D", "D"),
    ("answer is c", "C"),
    ("The answer is (C) Metformin", "C"),
    ("The answer is C. Metformin lowers glucose.", "C"),
    ("The correct answer is option C", "C"),
    ("answer is: (b)", "B"),
    ("Answer:\n\nC", "C"),
    ("\\boxed{C}", "C"),
    ("$\\boxed{\\text{B}}$", "B"),
    ("I would choose B because it is first line.", "B"),
    ("The answer is C because metformin is first line.", "C"),
    ("(C) is the correct answer.", "C"),
    ("Option A is incorrect. Option C is correct.", "C"),
    ("B) Insulin\nIt corrects the hyperglycemia.", "B"),
    ("A. Metformin", "A"),
    ("The answer is B. Option A is wrong because of renal failure.", "B"),
])
def test_parse_choice_reads_common_answer_formats(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize("text", [
    "A 45-year-old man presents with chest pain.",
    "The answer is a thiazide diuretic.",
    "Answer: A thiazide diuretic.",
    "The answer is B cells.",
    "The answer is E. coli infection.",
    "E. coli is the cause, i.e. a gram-negative rod.",
    "Vitamin D is the most likely deficiency.",
    "The answer is F",  # not one of A-E
    "",
])
def test_parse_choice_finds_no_letter_in_prose(text):
    assert parse_choice(text) is None


@pytest.mark.parametrize("text", [
    "The answer is B or C",
    "The answer is A, B and C",
    "Options A and C are both plausible.",
    "The answer is C. On reflection, the answer is D.",
])
def test_parse_choice_returns_none_when_two_letters_are_asserted(text):
    assert parse_choice(text) is None


OPTIONS = {"A": "Metformin", "B": "Insulin", "C": "Insulin glargine", "D": "Sulfonylurea"}


def test_parse_choice_matches_the_one_option_text_stated():
    assert parse_choice("Metformin is the first-line drug.", options=OPTIONS) == "A"


def test_parse_choice_prefers_the_longer_option_that_contains_a_shorter_one():
    assert parse_choice("Start insulin glargine at night.", options=OPTIONS) == "C"


def test_parse_choice_does_not_guess_between_two_option_texts():
    assert parse_choice("Either insulin or metformin would do.", options=OPTIONS) is None


def test_parse_choice_prefers_a_stated_letter_over_option_text():
    assert parse_choice("The answer is B, not metformin.", options=OPTIONS) == "B"


def test_parse_choice_takes_letters_from_the_options():
    six = {k: f"drug {k.lower()}" for k in "ABCDEF"}
    assert parse_choice("The answer is F.", options=six) == "F"
    assert parse_choice("The answer is D.", letters="ABC") is None


_FRAGMENTS = st.sampled_from(["The answer is ", "Answer: ", "option ", "(", ")", ".", " ", "\n", "**",
                              "or ", "\\boxed{", "}", "E. coli", "a ", "I "] + list(LETTERS + LETTERS.lower()))


@given(st.lists(_FRAGMENTS | st.text(max_size=5), max_size=15).map("".join),
       st.sets(st.sampled_from(LETTERS), min_size=1).map(sorted))
def test_parse_choice_never_returns_a_letter_outside_letters(text, letters):
    assert parse_choice(text, letters=letters) in (*letters, None)


@given(st.sets(st.sampled_from(LETTERS), min_size=1).map(sorted).flatmap(
    lambda letters: st.tuples(st.just(letters), st.sampled_from(letters))))
def test_parse_choice_reads_the_answer_is_sentence_for_any_letter(case):
    letters, letter = case
    assert parse_choice(f"The answer is {letter}.", letters=letters) == letter


# ------------------------------------------------------------------------------------------ summary

def fake_rows():
    return [
        row(answer="the cat sat on the mat", reference="the cat is on the mat", reasoning_tokens=10),
        row(answer="", reference="stress incontinence", think_closed=False, hit_token_limit=True,
            reasoning_tokens=100, answer_tokens=0),
        row(source="showcase", answer="Some answer", reasoning_tokens=20),
        row(source="mcq:medqa", answer="The answer is B.", correct_choice="B", reasoning_tokens=30),
        row(source="mcq:medqa", answer="A 45-year-old needs care.", correct_choice="A", reasoning_tokens=40),
        row(source="mcq:medqa", answer="(C)", correct_choice="D", reasoning_tokens=50),
    ]


def test_summarize_counts_format_as_closed_think_block_with_an_answer():
    s = summarize(fake_rows())
    assert s["n_generated"] == 6
    assert s["format"]["rate"] == pytest.approx(5 / 6, abs=1e-4)
    assert s["format"]["ci"] == [pytest.approx(x, abs=1e-4) for x in wilson_interval(5, 6)]
    assert s["think_closed_rate"] == pytest.approx(5 / 6, abs=1e-4)
    assert s["hit_token_limit_rate"] == pytest.approx(1 / 6, abs=1e-4)
    assert s["sources"] == {"heldout": 2, "mcq:medqa": 3, "showcase": 1}


def test_summarize_reports_median_and_p90_lengths():
    s = summarize(fake_rows())
    # sorted 10 20 30 40 50 100: median between 30 and 40; p90 at rank 4.5, halfway from 50 to 100
    assert s["reasoning_tokens"]["median"] == 35.0
    assert s["reasoning_tokens"]["p90"] == 75.0
    lo, hi = s["reasoning_tokens"]["median_ci"]
    assert lo <= 35.0 <= hi
    assert s["answer_tokens"]["median"] == 5.0


def test_summarize_scores_rouge_over_rows_with_a_reference_and_empty_answers_as_zero():
    s = summarize(fake_rows())
    assert s["rouge_l"]["n"] == 2
    assert s["rouge_l"]["mean"] == pytest.approx((5 / 6 + 0.0) / 2, abs=1e-4)


def test_summarize_counts_unparseable_mcq_answers_as_wrong_and_reports_them():
    medqa = summarize(fake_rows())["mcq"]["medqa"]
    assert medqa == {"accuracy": pytest.approx(1 / 3, abs=1e-4), "ci": [pytest.approx(x, abs=1e-4) for x in wilson_interval(1, 3)],
                     "n": 3, "correct": 1, "unparseable": 1}


def test_summarize_scores_heldout_rows_that_have_options():
    rows = fake_rows() + [row(options=OPTIONS, correct_choice="A", answer="Metformin.")]
    assert summarize(rows)["exact_choice"]["correct"] == 1
    assert summarize(fake_rows())["exact_choice"] is None


def test_summarize_heldout_perplexity_is_exp_of_token_weighted_loss():
    h = summarize(fake_rows(), heldout_token_losses=[(10.0, 5), (30.0, 5)])["heldout_loss"]
    assert h["loss"] == 4.0
    assert h["perplexity"] == pytest.approx(math.exp(4.0), abs=1e-3)
    assert h["n_examples"] == 2 and h["n_tokens"] == 10
    assert h["ci"][0] <= 4.0 <= h["ci"][1]
    assert summarize(fake_rows())["heldout_loss"] is None


def test_summarize_reports_generation_throughput_when_timed():
    rows = fake_rows()
    total = sum(r["generated_tokens"] for r in rows)
    assert summarize(rows, generation_seconds=10.0)["generated_tokens_per_s"] == pytest.approx(total / 10)
    assert summarize(rows)["generated_tokens_per_s"] is None


# --------------------------------------------------------------------------------------- comparison

def test_compare_gives_delta_and_judges_it_by_direction():
    before = summarize(fake_rows(), heldout_token_losses=[(10.0, 5), (30.0, 5)])
    after = summarize(fake_rows(), heldout_token_losses=[(5.0, 5), (15.0, 5)])
    after["format"]["rate"] = 1.0
    rows = {r["metric"]: r for r in compare(before, after)}
    assert rows["format rate"]["delta"] == pytest.approx(1 / 6, abs=1e-4)
    assert rows["format rate"]["better"] is True
    assert rows["held-out loss"]["delta"] == -2.0
    assert rows["held-out loss"]["better"] is True  # lower loss is better
    assert rows["MCQ medqa accuracy"]["better"] is None  # unchanged
    assert rows["median reasoning tokens"]["direction"] == "neither"


def test_compare_keeps_a_metric_present_on_one_side_only_without_delta():
    before = summarize(fake_rows())
    after = summarize(fake_rows(), heldout_token_losses=[(5.0, 5)])
    loss = next(r for r in compare(before, after) if r["metric"] == "held-out loss")
    assert loss["before"] is None and loss["after"] == 1.0 and loss["delta"] is None


def test_format_table_prints_aligned_markdown_with_intervals():
    table = format_table(compare(summarize(fake_rows()), summarize(fake_rows())))
    lines = table.splitlines()
    assert lines[0].startswith("| metric")
    assert len({len(line) for line in lines}) == 1
    assert "ROUGE-L" in table and "MCQ medqa accuracy" in table
    assert "0.833 [" in table


def test_mcnemar_exact_p_values():
    from medcot.metrics import mcnemar_exact_p

    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(0, 5) == pytest.approx(2 / 32)  # all 5 discordant pairs one way: 2 * 0.5**5
    assert mcnemar_exact_p(1, 9) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact_p(3, 3) == 1.0 and mcnemar_exact_p(9, 1) == mcnemar_exact_p(1, 9)


def test_paired_bootstrap_of_a_constant_difference_has_no_width():
    from medcot.metrics import paired_bootstrap_diff

    mean, ci = paired_bootstrap_diff([0.1, 0.5, 0.3], [0.3, 0.7, 0.5])
    assert mean == pytest.approx(0.2) and ci == pytest.approx((0.2, 0.2))
    # Question difficulty cancels: wildly different questions, the same gain each, a tight paired interval.
    mean, (lo, hi) = paired_bootstrap_diff([0.0, 0.9, 0.2, 0.6], [0.1, 1.0, 0.3, 0.7])
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)


def test_paired_tests_report_small_p_values_in_significant_digits_and_test_the_think_block():
    from medcot.metrics import paired_test_lines, paired_tests

    unclosed = {"source": "heldout", "think_closed": False, "answer": "", "reference": "ref"}
    closed = {"source": "heldout", "think_closed": True, "answer": "an answer", "reference": "ref"}
    tests = {t["metric"]: t for t in paired_tests([(unclosed, closed)] * 20)}
    # 20 of 20 improved: p = 2 * 0.5**20, which four decimals would print as 0.
    assert tests["think closed"]["p_value"] == pytest.approx(1.91e-06) == tests["format"]["p_value"]
    assert "Paired, think closed: 20 of 20 questions improved, 0 worsened; exact McNemar p = 1.91e-06." in \
        paired_test_lines(list(tests.values()))
