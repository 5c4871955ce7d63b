"""Knights and Knaves: generation (unique solutions, determinism, splits), prompt, and the verifier."""

import itertools

import pytest

from rlad_ds.tasks import kk

PUBLISHED = {  # a row in the published K&K JSONL format
    "quiz": "A very special island is inhabited only by knights and knaves. Knights always tell the truth, and "
    'knaves always lie. You meet 2 inhabitants: Zoey, and Oliver. Zoey remarked, "Oliver is not a '
    'knight". Oliver stated, "Oliver is a knight if and only if Zoey is a knave". So who is a knight '
    "and who is a knave?",
    "names": ["Zoey", "Oliver"],
    "solution": [False, True],
    "solution_text": "Zoey is a knave, and Oliver is a knight.",
}


def truth(statement, assignment):
    """Independent evaluator for the test (not kk.holds)."""
    op, args = statement[0], statement[1:]
    table = {
        "telling-truth": lambda: assignment[args[0]],
        "lying": lambda: not assignment[args[0]],
        "not": lambda: not truth(args[0], assignment),
        "and": lambda: all(truth(a, assignment) for a in args),
        "or": lambda: any(truth(a, assignment) for a in args),
        "->": lambda: not truth(args[0], assignment) or truth(args[1], assignment),
        "<=>": lambda: truth(args[0], assignment) == truth(args[1], assignment),
    }
    return table[op]()


def brute_force(statements):
    return [
        a
        for a in itertools.product([True, False], repeat=len(statements))
        if all(truth(s, a) == a[i] for i, s in enumerate(statements))
    ]


@pytest.fixture(scope="module")
def generated():
    return {split: kk.generate(split, 21, seed=3) for split in ("train", "test")}


def test_generated_puzzles_have_exactly_one_solution_for_every_size(generated):
    for split, records in generated.items():
        assert sorted({len(r["names"]) for r in records}) == list(range(2, 9))
        for record in records:
            found = brute_force(record["statements"])
            assert found == [tuple(record["solution"])], (split, record["quiz"])
            assert record["solution_text"] == kk.solution_text(record["names"], record["solution"])
            assert kk.subset(record) == f"PPL{len(record['names'])}"
            assert len(set(record["names"])) == len(record["names"])


def test_generation_is_deterministic_by_seed_and_splits_are_disjoint(generated):
    assert kk.generate("train", 21, seed=3) == generated["train"]
    assert kk.generate("train", 7, seed=4) != generated["train"][:7]
    as_logic = {split: {repr(r["statements"]) for r in records} for split, records in generated.items()}
    assert not as_logic["train"] & as_logic["test"]
    assert all(kk.split_of(r["statements"]) == split for split, rs in generated.items() for r in rs)


def test_puzzles_are_distinct_until_a_size_is_exhausted_then_repeat():
    # Two people admit only ~200 distinct puzzles per split.
    stream = kk.puzzles("test", 2, seed=0, stall_attempts=500)
    records = [next(stream) for _ in range(250)]
    logic = [repr(r["statements"]) for r in records]
    first_repeat = next(i for i, x in enumerate(logic) if x in logic[:i])
    assert len(set(logic[:first_repeat])) == first_repeat > 20
    assert all(brute_force(r["statements"]) == [tuple(r["solution"])] for r in records)


def test_generate_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        kk.generate("validation", 3, 0)


def test_statement_text():
    names = ["Ann", "Bob", "Cy"]
    assert kk.describe(("not", ("telling-truth", 1)), names) == "Bob is a knave"
    assert (
        kk.describe(("not", ("and", ("lying", 0), ("telling-truth", 2))), names)
        == "it is not the case that (Ann is a knave and Cy is a knight)"
    )
    assert (
        kk.describe(("->", ("telling-truth", 0), ("or", ("lying", 1), ("lying", 2))), names)
        == "if Ann is a knight then (Bob is a knave or Cy is a knave)"
    )
    assert (
        kk.describe(("<=>", ("lying", 0), ("telling-truth", 1)), names)
        == "Ann is a knave if and only if Bob is a knight"
    )
    quiz = kk.quiz_text([("lying", 1), ("telling-truth", 0)], names[:2])
    assert 'You meet 2 inhabitants: Ann, and Bob. Ann says, "Bob is a knave." Bob says, "Ann is a knight."' in quiz


def test_prompt_asks_for_the_answer_block_with_every_name():
    text = kk.prompt(PUBLISHED)
    assert text.startswith(PUBLISHED["quiz"])
    assert "<answer>" in text and "(1) Zoey is a knight/knave" in text and "(2) Oliver" in text


def answer(*lines):
    return "Let me think.\n<answer>\n" + "\n".join(lines) + "\n</answer>"


@pytest.mark.parametrize(
    "completion, expected, fraction",
    [
        (answer("(1) Zoey is a knave", "(2) Oliver is a knight"), 1.0, 1.0),
        ("<answer>Zoey is a knave, and oliver is A KNIGHT.</answer>", 1.0, 1.0),  # one line, any case
        (answer("(1) Zoey is a knight", "(2) Oliver is a knight"), 0.0, 0.5),  # one wrong
        (answer("(1) Zoey is a knight", "(2) Oliver is a knave"), 0.0, 0.0),  # both wrong
        (answer("(1) Zoey is a knave"), 0.0, 0.5),  # partial: Oliver missing
        (answer("(1) Zoey is a knave", "(2) Oliver is a knight", "(3) Zoey is a knight"), 0.0, 0.5),  # contradiction
        (answer("(1) Zoey is a knight/knave", "(2) Oliver is a knight/knave"), 0.0, 0.0),  # template copied
        (answer("(1) Zoey is a knave or a knight", "(2) Oliver is a knight"), 0.0, 0.5),  # hedge
        (answer("(1) Zoey is not a knight", "(2) Oliver is a knight"), 0.0, 0.5),  # not our format
        ("Zoey is a knave and Oliver is a knight.", 0.0, 0.0),  # no answer block
        ("<answer>(1) Zoey is a knave (2) Oliver is a knight", 0.0, 0.0),  # unclosed block
        (
            "<answer>Zoey is a knight</answer> on second thought <answer>Zoey is a knave\nOliver is a knight</answer>",
            1.0,
            1.0,
        ),  # the last block counts
        ("", 0.0, 0.0),
    ],
)
def test_verifier(completion, expected, fraction):
    assert kk.score(completion, PUBLISHED) == expected
    assert kk.person_accuracy(completion, PUBLISHED) == fraction


def test_names_match_whole_words_only():
    record = {"quiz": "q", "names": ["Ava", "Avery"], "solution": [True, False]}
    assert kk.score("<answer>(1) Ava is a knight (2) Avery is a knave</answer>", record) == 1.0
    assert kk.person_accuracy("<answer>(2) Avery is a knave</answer>", record) == 0.5


def test_gold_from_solution_text_when_solution_is_absent():
    record = {k: v for k, v in PUBLISHED.items() if k != "solution"}
    assert kk.gold(record) == (["Zoey", "Oliver"], [False, True])
    assert kk.score(answer("Zoey is a knave", "Oliver is a knight"), record) == 1.0


@pytest.mark.parametrize(
    "record, message",
    [
        ({"quiz": "q", "solution": [True]}, "names"),
        ({"quiz": "q", "names": ["A", "B"], "solution": [True]}, "1 solution entries for 2 names"),
        ({"quiz": "q", "names": ["A"], "solution": ["yes"]}, "list of booleans"),
        ({"quiz": "q", "names": ["A", "B"], "solution_text": "A is a knight."}, "solution_text"),
    ],
)
def test_malformed_records_raise(record, message):
    with pytest.raises(ValueError, match=message):
        kk.score("<answer>A is a knight</answer>", record)


def test_prompt_needs_quiz():
    with pytest.raises(ValueError, match="quiz"):
        kk.prompt({"names": ["A"], "solution": [True]})
