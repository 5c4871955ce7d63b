"""Loading prompt data: every file format, column mapping, rendering, file:line errors, skipping bad rows."""

import json
import time

import pytest

from rlad_ds import data
from rlad_ds.data import Example, load_examples
from rlad_ds.errors import ConfigError
from rlad_ds.tasks import get_task
from rlad_ds.tasks.base import Task

MATH = get_task("math")
KK = get_task("kk")
ROWS = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(1, 5)]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def assert_math_rows(examples, rows=ROWS):
    assert [e.record["question"] for e in examples] == [r["question"] for r in rows]
    assert all(isinstance(e, Example) and e.text == MATH.prompt(e.record) for e in examples)
    assert MATH.score("\\boxed{2}", examples[0].record) == 1.0


def test_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", ROWS[:2] + [""] + ROWS[2:])  # blank lines are fine
    examples = load_examples(MATH, path)
    assert_math_rows(examples)
    assert examples.skipped == 0


def test_json_array_and_json_lines_named_json(tmp_path):
    (tmp_path / "array.json").write_text(json.dumps(ROWS, indent=1))
    assert_math_rows(load_examples(MATH, tmp_path / "array.json"))
    write_jsonl(tmp_path / "lines.json", ROWS)
    assert_math_rows(load_examples(MATH, str(tmp_path / "lines.json")))


def test_line_separators_inside_a_row_do_not_split_it(tmp_path):
    """JSON lines end at line feeds; str.splitlines() also broke rows at U+2028, U+0085 and form feeds."""
    import datasets

    rows = [{**row, "question": row["question"] + sep} for row, sep in zip(ROWS, ["\u2028", "\x85", "\x0c", "\u2029"])]
    path = tmp_path / "seps.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) + "{not json\n")
    with pytest.raises(ConfigError, match=r"seps\.jsonl:5: invalid JSON"):  # the line an editor shows
        load_examples(MATH, path)
    examples = load_examples(MATH, path, skip_bad_rows=True)
    assert [e.record["question"] for e in examples] == [r["question"] for r in rows] and examples.skipped == 1
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    loaded = datasets.load_dataset("json", data_files=str(path), split="train")  # the same rows as `datasets` reads
    assert [r["question"] for r in loaded] == [e.record["question"] for e in load_examples(MATH, path)]


def test_rows_pythons_json_parser_cannot_read_are_bad_rows(tmp_path):
    """100,000 nested lists raised RecursionError and a 5,000-digit integer ValueError, even with skip_bad_rows."""
    deep, huge = "[" * 100_000, '{"question": "q", "answer": ' + "7" * 5000 + "}"
    path = write_jsonl(tmp_path / "odd.jsonl", [ROWS[0], deep, ROWS[1], huge, ROWS[2]])
    with pytest.raises(ConfigError, match=r"odd\.jsonl:2: JSON that Python cannot read \(nested too deeply\)"):
        load_examples(MATH, path)
    examples = load_examples(MATH, path, skip_bad_rows=True)
    assert_math_rows(examples, ROWS[:3])
    assert (
        examples.skipped == 2 and "odd.jsonl:4: JSON that Python cannot read (Exceeds the limit" in examples.messages[1]
    )
    for text in (deep, f"[{huge}]"):
        (tmp_path / "odd.json").write_text(text)
        with pytest.raises(ConfigError, match=r"odd\.json: JSON that Python cannot read") as error:
            load_examples(MATH, tmp_path / "odd.json", skip_bad_rows=True)
        assert "\n" not in str(error.value)


def test_a_json_object_file_is_read_through_its_list_field_or_named(tmp_path):
    """A valid `{"data": [...]}` file was reported as invalid JSON."""
    (tmp_path / "obj.json").write_text(json.dumps({"data": ROWS}, indent=2))
    examples = load_examples(MATH, tmp_path / "obj.json")
    assert_math_rows(examples)
    (tmp_path / "obj.json").write_text(json.dumps({"data": [ROWS[0], "text"]}, indent=2))
    with pytest.raises(ConfigError, match=r'obj\.json\["data"\]\[1\]: expected a JSON object, got str'):
        load_examples(MATH, tmp_path / "obj.json")
    for value, keys in (({"version": 1, "data": ROWS}, "'version', 'data'"), (ROWS[0], "'question', 'answer'")):
        (tmp_path / "obj.json").write_text(json.dumps(value, indent=2))
        with pytest.raises(ConfigError, match=rf"obj\.json holds one JSON object \(keys: {keys}\), not rows; write"):
            load_examples(MATH, tmp_path / "obj.json")
    (tmp_path / "one.json").write_text(json.dumps(ROWS[0]))  # one object on one line: JSON lines of one row
    assert_math_rows(load_examples(MATH, tmp_path / "one.json"), ROWS[:1])


def test_parquet_and_csv(tmp_path):
    import datasets

    dataset = datasets.Dataset.from_list(ROWS)
    dataset.to_parquet(str(tmp_path / "gsm.parquet"))
    dataset.to_csv(str(tmp_path / "gsm.csv"), index=False)
    assert_math_rows(load_examples(MATH, tmp_path / "gsm.parquet"))
    assert_math_rows(load_examples(MATH, tmp_path / "gsm.csv"))


def test_saved_dataset_dirs(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    assert_math_rows(load_examples(MATH, tmp_path / "single"))
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:1]), "test": datasets.Dataset.from_list(ROWS)}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert_math_rows(load_examples(MATH, tmp_path / "dict", split="test"))
    assert len(load_examples(MATH, tmp_path / "dict")) == 1
    with pytest.raises(ConfigError, match="no split 'validation'; it has train, test"):
        load_examples(MATH, tmp_path / "dict", split="validation")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="not a saved dataset"):
        load_examples(MATH, tmp_path / "plain")


def test_hub_names_pass_through_to_load_dataset(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: calls.append((name, split)) or ROWS)
    assert_math_rows(load_examples(MATH, "openai/gsm8k", split="test"))
    assert calls == [("openai/gsm8k", "test")]


def test_column_mapping(tmp_path):
    rows = [{"q": r["question"], "final": str(2 * i)} for i, r in enumerate(ROWS, 1)]
    path = write_jsonl(tmp_path / "custom.jsonl", rows)
    for columns in ("prompt=q, answer=final", {"prompt": "q", "answer": "final"}):
        examples = load_examples(MATH, path, columns=columns)
        assert examples[1].record["prompt"] == ROWS[1]["question"] and examples[1].record["q"] == ROWS[1]["question"]
        assert MATH.score("\\boxed{4}", examples[1].record) == 1.0
    with pytest.raises(ConfigError, match=r"custom.jsonl:1: missing column 'question' \(row has: q, final\)"):
        load_examples(MATH, path, columns="prompt=question,answer=final")


@pytest.mark.parametrize("columns", ["prompt", "prompt=", "=q", "prompt=q,answer"])
def test_bad_column_mapping(columns):
    with pytest.raises(ConfigError, match="task_column=dataset_column"):
        data.parse_columns(columns)


BAD_LINES = [ROWS[0], "{not json", ROWS[1], "[1, 2]", {"question": "no answer"}, ROWS[2]]


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: invalid JSON .* \(pass skip_bad_rows") as error:
        load_examples(MATH, path)
    assert "\n" not in str(error.value)
    write_jsonl(path, [ROWS[0], ROWS[1], "[1, 2]"])
    with pytest.raises(ConfigError, match=r"bad\.jsonl:3: expected a JSON object, got list"):
        load_examples(MATH, path)
    write_jsonl(path, [ROWS[0], {"question": "no answer"}])
    with pytest.raises(ConfigError, match=r"bad\.jsonl:2: math record needs 'answer'"):
        load_examples(MATH, path)


def test_skip_bad_rows_counts_them(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    examples = load_examples(MATH, path, skip_bad_rows=True)
    assert_math_rows(examples, ROWS[:3])
    assert examples.skipped == 3
    assert [m.split(": ")[0].rsplit("/", 1)[-1] for m in examples.messages] == [
        "bad.jsonl:2",
        "bad.jsonl:4",
        "bad.jsonl:5",
    ]


def test_bad_rows_in_other_formats_name_the_row(tmp_path):
    import datasets

    datasets.Dataset.from_list([ROWS[0], {"question": "q", "answer": ""}]).to_csv(str(tmp_path / "x.csv"), index=False)
    with pytest.raises(ConfigError, match=r"x\.csv row 2: math record needs 'answer'"):
        load_examples(MATH, tmp_path / "x.csv")
    (tmp_path / "x.json").write_text(json.dumps([ROWS[0], "text"]))
    with pytest.raises(ConfigError, match=r"x\.json\[1\]: expected a JSON object, got str"):
        load_examples(MATH, tmp_path / "x.json")
    (tmp_path / "y.json").write_text('[\n{"question": "q",\n "answer": }]')
    with pytest.raises(ConfigError, match=r"y\.json:3: invalid JSON"):
        load_examples(MATH, tmp_path / "y.json")
    (tmp_path / "z.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match=r"z\.parquet: cannot read as parquet"):
        load_examples(MATH, tmp_path / "z.parquet")


def test_missing_empty_and_unusable_files(tmp_path):
    with pytest.raises(ConfigError, match="no such file or directory"):
        load_examples(MATH, tmp_path / "absent.jsonl")
    with pytest.raises(ConfigError, match="no such file or directory"):
        load_examples(MATH, "./data/absent")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ConfigError, match="the file is empty"):
        load_examples(MATH, tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ConfigError, match="no usable rows$"):
        load_examples(MATH, tmp_path / "blank.jsonl")
    write_jsonl(tmp_path / "allbad.jsonl", ["{", "{"])
    with pytest.raises(ConfigError, match=r"no usable rows \(2 bad rows skipped; first: .*allbad.jsonl:1: invalid"):
        load_examples(MATH, tmp_path / "allbad.jsonl", skip_bad_rows=True)
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(ConfigError, match="unknown file type '.txt'"):
        load_examples(MATH, tmp_path / "rows.txt")


def test_n_caps_rows(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", ROWS)
    assert len(load_examples(MATH, path, n=2)) == 2
    with pytest.raises(ConfigError, match="n >= 1"):
        load_examples(MATH, path, n=0)


def test_chat_template_with_system_prompt(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "gsm.jsonl", ROWS[:1])
    example = load_examples(MATH, path, tokenizer=tiny_tokenizer, system_prompt="Be brief.")[0]
    user = MATH.prompt(example.record)
    assert example.text == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
    bare = load_examples(MATH, path, tokenizer=tiny_tokenizer)[0]
    assert bare.text == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def test_raw_template_keeps_latex_braces(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", ROWS[:1])
    example = load_examples(MATH, path, template="Q: {prompt}\nA:")[0]
    assert example.text == f"Q: {MATH.prompt(example.record)}\nA:" and "\\boxed{}" in example.text


def test_rendering_option_errors(tiny_tokenizer):
    from rlad_ds.tiny import char_tokenizer

    with pytest.raises(ConfigError, match="no {prompt} placeholder"):
        data.Renderer(template="Question:")
    with pytest.raises(ConfigError, match="not both"):
        data.Renderer(tiny_tokenizer, template="{prompt}")
    with pytest.raises(ConfigError, match="system prompt needs"):
        data.Renderer(system_prompt="Be brief.")
    no_template = char_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        data.Renderer(no_template)


def test_generated_data_when_no_source(tiny_tokenizer):
    examples = load_examples(KK, None, split="test", n=3, seed=1, tokenizer=tiny_tokenizer)
    assert [len(e.record["names"]) for e in examples] == [2, 3, 4]
    assert examples[0].text.startswith("<|im_start|>user\nA very special island")
    assert [e.record for e in examples] == KK.generate("test", 3, 1)
    with pytest.raises(ConfigError, match="say how many"):
        load_examples(KK)
    with pytest.raises(ConfigError, match="task 'math' has no built-in data"):
        load_examples(MATH, n=3)


def test_published_kk_jsonl(tmp_path):
    rows = [
        {"quiz": "Q", "names": ["Ann", "Bob"], "solution": [True, False], "solution_text": "x"},
        {"quiz": "Q", "names": ["Ann", "Bob"], "solution": [True]},
    ]
    examples = load_examples(KK, write_jsonl(tmp_path / "kk.jsonl", rows), skip_bad_rows=True)
    assert len(examples) == 1 and examples.skipped == 1
    assert "kk.jsonl:2: K&K record has 1 solution" in examples.messages[0]


def test_trainer_adapters_read_the_config(tmp_path, tiny_tokenizer):
    import datasets

    from rlad_ds.config.parsing import config_from_layers

    def config(data=None, eval=None, seed=0):
        return config_from_layers({"data": data or {}, "eval": eval or {}, "train": {"seed": seed}})

    generated = data.load_train_examples(config({"task": "kk", "train_size": 3}).data, tiny_tokenizer, seed=2)
    assert [r["names"] for r in generated] == [r["names"] for r in KK.generate("train", 3, 2)]
    assert generated[0]["prompt_text"].startswith("<|im_start|>user\n")
    held_out = data.load_eval_examples(config({"task": "kk"}, {"eval_size": 2}, seed=2), tiny_tokenizer)
    assert [r["quiz"] for r in held_out] == [r["quiz"] for r in KK.generate("test", 2, 2)]
    assert data.load_eval_examples(config({"task": "kk"}, {"eval_size": 0}), tiny_tokenizer) == []
    with pytest.raises(ConfigError, match="say how many 'kk' problems"):
        data.load_eval_examples(config({"task": "kk"}, {"eval_size": None}), tiny_tokenizer)

    path = write_jsonl(tmp_path / "q.jsonl", [{"q": r["question"], "answer": r["answer"]} for r in ROWS] + ["{"])
    file_data = {
        "task": "math",
        "dataset": str(path),
        "columns": "prompt=q",
        "prompt_template": "Q: {prompt}",
        "skip_bad_rows": True,
    }
    rows = data.load_train_examples(config(file_data).data, tiny_tokenizer)
    assert len(rows) == 4 and rows[0]["prompt_text"] == "Q: " + MATH.prompt(rows[0])
    assert data.load_eval_examples(config(file_data, {"eval_size": 2}), tiny_tokenizer) == []  # nothing held out
    # A separate held-out file: every usable row (eval_size none), the bad one skipped and counted.
    held_out = data.load_eval_examples(
        config(file_data, {"eval_size": None, "eval_dataset": str(path)}), tiny_tokenizer
    )
    assert len(held_out) == 4 and held_out.skipped == 1 and held_out[0]["prompt_text"].startswith("Q: ")

    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:1]), "test": datasets.Dataset.from_list(ROWS)}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    saved = {"task": "math", "dataset": str(tmp_path / "dict"), "system_prompt": "Be brief."}
    assert len(data.load_train_examples(config(saved).data, tiny_tokenizer)) == 1
    held_out = data.load_eval_examples(config(saved, {"eval_size": 3}), tiny_tokenizer)
    assert [r["question"] for r in held_out] == [r["question"] for r in ROWS[:3]]
    assert "Be brief." in held_out[0]["prompt_text"]


def test_rendering_and_checking_many_prompts_show_progress(tiny_tokenizer, monkeypatch, caplog):
    """After generation, a million prompts take minutes to render (about 10,000 a second here) and to tokenize and check
    (about 5,000 a second)."""
    from rlad_ds.config.parsing import config_from_layers
    from rlad_ds.tasks import base

    monkeypatch.setattr(base, "FIRST_PROGRESS_S", 0.0)
    monkeypatch.setattr(data, "CHECK_CHUNK", 2)
    with caplog.at_level("INFO", logger="rlad_ds"):
        examples = data.load_train_examples(
            config_from_layers({"data": {"task": "arith", "train_size": 3}}).data, tiny_tokenizer
        )
    assert len(examples) == 3
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "arith train problems generated: 1 / 3",
        "prompts rendered: 1 / 3",
        "prompts tokenized and checked: 2 / 3",
    ]
    caplog.clear()

    def slow_generate(split, n, seed):  # the time left to render is not the generation's
        time.sleep(1.0)
        return [{"p": f"q{i}"} for i in range(n)]

    slow = Task(name="slow", prompt=lambda example: example["p"], score=lambda c, e: 0.0, generate=slow_generate)
    with caplog.at_level("INFO", logger="rlad_ds"):
        load_examples(slow, None, n=3)
    assert [r.getMessage() for r in caplog.records] == ["prompts rendered: 1 / 3 (33%), about 0 s left"]
