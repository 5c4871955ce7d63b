"""Math: gold answers from every record format, answer extraction, math-verify equivalences, timeouts."""

import threading
import time

import pytest

from rlad_ds.tasks import math as m

GSM8K = {"question": "Tom has 600 apples and buys 400 more. How many?", "answer": "600 + 400 = 1,000\n#### 1,000"}
MATH = {
    "problem": "What is $1 - \\frac{1}{2}$?",
    "solution": "We get $\\boxed{\\frac{1}{2}}$ since $1-\\frac12=\\frac12$.",
}
GENERIC = {"prompt": "Half of one?", "answer": "\\frac{1}{2}"}


@pytest.mark.parametrize(
    "record, gold",
    [
        (GSM8K, "1000"),
        (MATH, "\\boxed{\\frac{1}{2}}"),
        ({**MATH, "answer": "1/2"}, "1/2"),  # MATH500 rows carry both; the short answer wins
        (GENERIC, "\\frac{1}{2}"),
        ({"prompt": "p", "answer": 42}, "42"),
        ({"prompt": "p", "solution": "nested \\boxed{\\frac{a}{\\sqrt{b}}} end"}, "\\boxed{\\frac{a}{\\sqrt{b}}}"),
        ({"prompt": "p", "solution": "\\boxed{1} or \\boxed{2}"}, "\\boxed{1}, \\boxed{2}"),
    ],
)
def test_gold_answer(record, gold):
    assert m.gold_answer(record) == gold


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": "p"}, "needs 'answer'"),
        ({"prompt": "p", "solution": "no box here"}, "no \\\\boxed"),
        ({"prompt": "p", "answer": "   "}, "needs 'answer'"),
    ],
)
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


def test_boxed_contents_and_answer_region():
    assert m.boxed_contents("a \\boxed{1} b \\fbox{\\frac{2}{3}} \\boxed{unclosed") == ["1", "\\frac{2}{3}"]
    assert m.answer_region("x \\boxed{1} <answer>7</answer>") == "x \\boxed{1} <answer>7</answer>"  # a box wins
    assert m.answer_region("<answer> 7 </answer> then <answer>8</answer>") == "8"
    assert m.answer_region("<answer>  </answer> so 12.5") == "<answer>  </answer> so 12.5"
    assert m.answer_region("no block") == "no block"


@pytest.mark.parametrize(
    "gold_record, completion, expected",
    [
        # The escaped dollar: in a completion, in an `answer` gold and in a MATH solution's box.
        ({"answer": "\\$18.90"}, "She pays \\boxed{\\$18.90}.", 1.0),
        ({"solution": "So she pays \\boxed{\\$18.90}."}, "\\boxed{18.9}", 1.0),
        ({"solution": "So she pays \\boxed{\\$18.90}."}, "\\boxed{\\$17}", 0.0),
        ({"solution": "Total: \\boxed{\\$16,\\!386.20}"}, "The answer is \\boxed{16386.20}", 1.0),
        # Several boxes are one set answer, on either side.
        ({"answer": "(2,2),(6,2)"}, "\\boxed{(2,2)}, \\boxed{(6,2)}", 1.0),
        ({"answer": "(2,2),(6,2)"}, "\\boxed{(6,2)}", 0.0),
        ({"solution": "pairs \\boxed{(2,2)} and \\boxed{(6,2)}"}, "\\boxed{(6,2), (2,2)}", 1.0),
        # Percent, units and thousands separators.
        ({"answer": "50\\%"}, "\\boxed{50}", 1.0),
        ({"answer": "10 \\text{ cm}"}, "\\boxed{10}", 1.0),
        ({"answer": "7425000"}, "\\boxed{7,425,000}", 1.0),
        # No box: the <answer> block, else LaTeX / expressions near a "final answer" anchor.
        ({"answer": "72"}, "I think <answer>72</answer>", 1.0),
        ({"answer": "72"}, "48 + 24, so the final answer is $72$.", 1.0),
        ({"answer": "\\frac{\\sqrt{3}}{2}"}, "\\boxed{\\frac{\\sqrt3}{2}}", 1.0),
        ({"answer": "x^2+1"}, "\\boxed{1+x^2}", 1.0),
        ({"answer": 33}, "\\boxed{033}", 1.0),
    ],
)
def test_math_verify_conventions(gold_record, completion, expected):
    assert m.score(completion, {"problem": "p", **gold_record}) == expected


@pytest.mark.parametrize(
    "record, message",
    [
        ({"problem": "p", "answer": "proof"}, "no checkable answer"),
        ({"problem": "p", "answer": "notfound"}, "no checkable answer"),
        ({"problem": "p", "answer": "12", "question_type": "proof"}, "is a proof"),
    ],
)
def test_numina_markers_are_refused(record, message):
    with pytest.raises(ValueError, match=message):
        m.prompt(record)


def test_reference_completions_score_one():
    for record in (
        GSM8K,
        MATH,
        GENERIC,
        {"problem": "p", "solution": "\\boxed{1} and \\boxed{2}"},
        {"problem": "p", "answer": "\\$18.90"},
    ):
        assert m.score(m.reference(record), record) == 1.0, record


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{\\frac{1}{2}}",
        "\\boxed{\\dfrac{1}{2}}",
        "\\boxed{0.5}",
        "\\boxed{1/2}",
        "<answer>$\\frac12$</answer>",
        "so it is 0.5",
    ],
)
def test_equivalent_forms_of_one_half_are_correct(completion):
    for record in (MATH, GENERIC):
        assert m.score(completion, record) == 1.0


@pytest.mark.parametrize(
    "completion", ["\\boxed{\\frac{1}{3}}", "\\boxed{0.6}", "nothing", "", "\\boxed{}", "<answer>half</answer>"]
)
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
