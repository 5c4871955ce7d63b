"""How often `rlad_ds.rewards.score("math", ...)` gives the verdict Math-Verify's own test suite expects.

    git clone https://github.com/huggingface/Math-Verify /tmp/Math-Verify
    python -m benchmarks.math_agreement /tmp/Math-Verify/tests [--differences] [--json out.json]

The cases are read from the checkout (nothing of it is copied here): every `pytest.mark.parametrize` list of
(gold, pred, expected) whose test compares with Math-Verify's default settings, i.e. `compare_strings(gold,
pred)` with no precision / strictness / set-relation option (any match types: latex, expr or both), or a
plain `verify(parse(gold), parse(pred))`. Each case is scored as a training reward is: `pred` is the completion
and `gold` the record's `answer` field. Math-Verify's own verdict on the same case is printed beside ours,
so a case its installed version gets "wrong" is visible as such.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

from rlad_ds.rewards import score

DEFAULT_MATCH_TYPES = ("latex", "expr")


def _default_match_types(call: ast.Call) -> tuple[str, ...] | None:
    """The match types of a default-settings comparison, or None when the call sets another option."""
    name = getattr(call.func, "id", None)
    if name == "verify":  # verify(parse(gold), parse(pred)) with no options: parse's own defaults
        plain = not call.keywords and all(
            isinstance(a, ast.Call) and not a.keywords and len(a.args) == 1 for a in call.args
        )
        return ("parse-defaults",) if plain else None
    keywords = {k.arg: k.value for k in call.keywords}
    if name != "compare_strings" or set(keywords) - {"match_types"} or len(call.args) != 2:
        return None
    return tuple(ast.literal_eval(keywords["match_types"])) if "match_types" in keywords else DEFAULT_MATCH_TYPES


def _parametrized_cases(function: ast.FunctionDef):
    for decorator in function.decorator_list:
        if not (isinstance(decorator, ast.Call) and ast.unparse(decorator.func).endswith("parametrize")):
            continue
        names = [n.strip() for n in ast.literal_eval(decorator.args[0]).split(",")]
        for row in ast.literal_eval(decorator.args[1]):
            case = dict(zip(names, row))
            yield case["gold"], case["pred"], bool(case.get("expected", case.get("result")))


def collect_cases(tests_dir: Path) -> list[dict]:
    """(file, test, gold, pred, expected) of every default-settings case in a Math-Verify tests directory."""
    cases = []
    for path in sorted(tests_dir.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            calls = [
                c
                for c in ast.walk(node)
                if isinstance(c, ast.Call) and getattr(c.func, "id", None) in ("compare_strings", "verify")
            ]
            match_types = _default_match_types(calls[0]) if len(calls) == 1 else None
            if match_types is None:
                continue
            for gold, pred, expected in _parametrized_cases(node):
                cases.append(
                    {
                        "file": path.name,
                        "test": node.name,
                        "gold": gold,
                        "pred": pred,
                        "expected": expected,
                        "match_types": match_types,
                    }
                )
    return cases


def reference_verdict(gold: str, pred: str, match_types: tuple[str, ...]) -> bool:
    """Math-Verify's verdict on a case, with the settings its test uses."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if match_types == ("parse-defaults",):
        return bool(verify(parse(gold), parse(pred)))
    configs = {"latex": LatexExtractionConfig(boxed_match_priority=0), "expr": ExprExtractionConfig()}
    chosen = [configs[kind] for kind in match_types]
    return bool(verify(parse(gold, chosen), parse(pred, chosen)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests_dir", type=Path, help="the tests/ directory of a Math-Verify checkout")
    parser.add_argument("--differences", action="store_true", help="print every case where we disagree")
    parser.add_argument("--json", type=Path, help="write every case and verdict here")
    args = parser.parse_args(argv)
    if not args.tests_dir.is_dir():
        parser.error(f"{args.tests_dir}: not a directory; clone https://github.com/huggingface/Math-Verify")
    cases = collect_cases(args.tests_dir)
    if not cases:
        parser.error(f"{args.tests_dir}: no parametrized (gold, pred, expected) cases found")
    for case in cases:
        case["ours"] = score("math", case["pred"], {"answer": case["gold"]}) == 1.0
        case["math_verify"] = reference_verdict(case["gold"], case["pred"], case["match_types"])
    ours = sum(c["ours"] == c["expected"] for c in cases)
    reference = sum(c["math_verify"] == c["expected"] for c in cases)
    print(f"cases: {len(cases)} from {len({c['file'] for c in cases})} files")
    print(f"rlad_ds agrees with the expected verdict: {ours}/{len(cases)} ({100 * ours / len(cases):.1f}%)")
    print(f"math-verify itself agrees:                {reference}/{len(cases)} ({100 * reference / len(cases):.1f}%)")
    if args.differences:
        for c in cases:
            if c["ours"] != c["expected"]:
                print(
                    f"- {c['file']}::{c['test']} expected={int(c['expected'])} ours={int(c['ours'])} "
                    f"math_verify={int(c['math_verify'])} match={'+'.join(c['match_types'])}\n"
                    f"    gold={c['gold']!r}\n    pred={c['pred']!r}"
                )
    if args.json:
        args.json.write_text(json.dumps(cases, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
