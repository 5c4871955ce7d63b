"""Math: gold answers from every record format, answer extraction, math-verify equivalences, timeouts."""

import threading
import time

import pytest

from rlad_ds.tasks import math as m

GSM8K = {"question": "Tom has 600 apples and buys 400 more. How many?", "answer": "600 + 400 = 1,000\n#### 1,000"}
MATH = {"problem": "What is $1 - \\frac{1}{2}$?",
        "solution": "We get $\\boxed{\\frac{1}{2}}$ since $1-\\frac12=\\frac12$."}
GENERIC = {"prompt": "Half of one?", "answer": "\\frac{1}{2}"}


@pytest.mark.parametrize("record, gold", [
    (GSM8K, "1000"),
    (MATH, "\\frac{1}{2}"),
    ({**MATH, "answer": "1/2"}, "1/2"),  # MATH500 rows carry both; the short answer wins
    (GENERIC, "\\frac{1}{2}"),
    ({"prompt": "p", "answer": 42}, "42"),
    ({"prompt": "p", "solution": "nested \\boxed{\\frac{a}{\\sqrt{b}}} end"}, "\\frac{a}{\\sqrt{b}}"),
])
def test_gold_answer(record, gold):
    assert m.gold_answer(record) == gold


@pytest.mark.parametrize("record, message", [
    ({"prompt": "p"}, "needs 'answer'"),
    ({"prompt": "p", "solution": "no box here"}, "no \\\\boxed"),
    ({"prompt": "p", "answer": "   "}, "needs 'answer'"),
])
def test_malformed_gold_raises_even_for_empty_completion(record, message):
    with pytest.raises(ValueError, match=message):
        m.score("", record)


def test_question_and_prompt():
    assert m.question(GSM8K) == GSM8K["question"]
    assert m.question(MATH) == MATH["problem"]
    assert m.prompt(GENERIC).startswith("Half of one?") and "\\boxed{}" in m.prompt(GENERIC)
    with pytest.raises(ValueError, match="'prompt', 'question' or 'problem'"):
        m.prompt({"answer": "1"})
    assert m.subset(GENERIC) == "all" and m.subset({**GENERIC, "subset": 3}) == "3"


@pytest.mark.parametrize("completion, extracted", [
    ("first \\boxed{1} then \\boxed{\\frac{2}{3}} done", "\\frac{2}{3}"),
    ("\\boxed{x} and <answer>7</answer>", "x"),  # boxed beats the answer block
    ("<answer> 7 </answer> then <answer>8</answer>", "8"),
    ("<answer>   </answer> the total is 1,250, so 12.5 each", "12.5"),
    ("we sum to 1,000, and stop", "1,000"),
    ("the ratio is -3/4", "-3/4"),
    ("\\boxed{unclosed", None),
    ("no numbers at all", None),
])
def test_extract_answer(completion, extracted):
    assert m.extract_answer(completion) == extracted


@pytest.mark.parametrize("completion", ["\\boxed{\\frac{1}{2}}", "\\boxed{\\dfrac{1}{2}}", "\\boxed{0.5}",
                                        "\\boxed{1/2}", "<answer>$\\frac12$</answer>", "so it is 0.5"])
def test_equivalent_forms_of_one_half_are_correct(completion):
    for record in (MATH, GENERIC):
        assert m.score(completion, record) == 1.0


@pytest.mark.parametrize("completion", ["\\boxed{\\frac{1}{3}}", "\\boxed{0.6}", "nothing", "", "\\boxed{}",
                                        "<answer>half</answer>", "\\boxed{\\frac{1}{2}"])
def test_wrong_missing_and_unparsable_answers_score_zero(completion):
    assert m.score(completion, GENERIC) == 0.0


def test_gsm8k_numbers_with_commas():
    assert m.score("The answer is \\boxed{1000}.", GSM8K) == 1.0
    assert m.score("So 1,000 apples.", GSM8K) == 1.0
    assert m.score("So 999 apples.", GSM8K) == 0.0


def test_pathological_answer_returns_within_its_timeout():
    tower = "\\boxed{9^{9^{9^{9^{9}}}}}"
    m.score("\\boxed{1}", GENERIC)  # the worker is started outside the timed region
    start = time.monotonic()
    assert m.score(tower, {"prompt": "p", "answer": "5"}, timeout_s=1.0) == 0.0
    assert time.monotonic() - start < 3.0
    assert m.score("\\boxed{5}", {"prompt": "p", "answer": "5"}) == 1.0  # a fresh worker took over


def test_scoring_from_a_thread():
    # math-verify's own SIGALRM timeout refuses to run outside the main thread; ours does not care.
    results = []
    thread = threading.Thread(target=lambda: results.append(m.score("\\boxed{0.5}", GENERIC)))
    thread.start()
    thread.join(60)
    assert results == [1.0]


def test_verify_strings_in_process():
    assert m.verify_strings("\\frac{1}{2}", "0.5", signal_timeout_s=2)
    assert not m.verify_strings("2", "3")
    assert not m.verify_strings("2", "")
