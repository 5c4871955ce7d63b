"""The task registry (built-ins and --task module:function), `score`, and `RewardRunner` timeouts / errors."""

import textwrap
import time

import pytest

from rlad_ds import isolation, rewards, tasks
from rlad_ds.errors import ConfigError
from rlad_ds.tasks.base import Task

USER_TASKS = textwrap.dedent("""
    import os
    import time

    from rlad_ds.tasks.base import Task


    def _score(completion, example):
        if completion == "hang":
            time.sleep(120)
        if completion == "boom":
            raise RuntimeError("verifier bug")
        if completion == "die":
            os._exit(3)
        if completion == "big":
            return 2.0
        return 1.0 if completion == example["answer"] else 0.0


    def make():
        return Task(name="echo", prompt=lambda example: example["q"], score=_score)


    def not_a_task():
        return 42


    VALUE = 3
""")


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    """An importable module `rlad_user_tasks` (on sys.path, which workers inherit)."""
    root = tmp_path_factory.mktemp("user_tasks")
    (root / "rlad_user_tasks.py").write_text(USER_TASKS)
    (root / "rlad_broken_tasks.py").write_text("import rlad_no_such_dependency\n")
    with pytest.MonkeyPatch.context() as patch:  # a user's own module dir, put first on sys.path
        patch.syspath_prepend(str(root))
        yield "rlad_user_tasks"


# ---------------------------------------------------------------- registry


def test_builtin_tasks():
    assert tasks.known_tasks() == ["arith", "kk", "math"]
    for name in tasks.known_tasks():
        task = tasks.get_task(name)
        assert isinstance(task, Task) and task.name == name


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown task 'kkk'; choose one of arith, kk, math"):
        tasks.get_task("kkk")


def test_missing_builtin_module_is_a_config_error(monkeypatch):
    monkeypatch.setitem(tasks.BUILTIN, "ghost", "rlad_ds.tasks.ghost")
    with pytest.raises(ConfigError, match="cannot import module 'rlad_ds.tasks.ghost'"):
        tasks.get_task("ghost")


def test_user_task_from_module_function(user_module):
    task = tasks.get_task(f"{user_module}:make")
    assert task.name == "echo" and task.score("x", {"answer": "x"}) == 1.0
    assert tasks.get_task(f"{user_module}:make") is task  # the function runs once
    assert rewards.score(f"{user_module}:make", "y", {"answer": "x"}) == 0.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("rlad_user_tasks:not_a_task", "returned int, not a rlad_ds.tasks.base.Task"),
        ("rlad_user_tasks:missing", "has no function 'missing'"),
        ("rlad_user_tasks:VALUE", "has no function 'VALUE'"),
        ("rlad_no_such_module:make", "cannot import module 'rlad_no_such_module'"),
        (":make", "write module:function"),
        ("rlad_user_tasks:", "write module:function"),
        ("a:b:c", "write module:function"),
    ],
)
def test_user_task_errors_are_one_line(user_module, spec, message):
    with pytest.raises(ConfigError, match=message) as error:
        tasks.get_task(spec)
    assert "\n" not in str(error.value)


def test_a_missing_dependency_of_a_user_module_is_not_hidden(user_module):
    with pytest.raises(ModuleNotFoundError, match="rlad_no_such_dependency"):
        tasks.get_task("rlad_broken_tasks:make")


# ---------------------------------------------------------------- score

KK = {"quiz": "q", "names": ["Ann", "Bob"], "solution": [True, False]}


def test_score_each_builtin_task():
    assert rewards.score("kk", "<answer>(1) Ann is a knight\n(2) Bob is a knave</answer>", KK) == 1.0
    assert rewards.score("kk", "<answer>(1) Ann is a knight</answer>", KK) == 0.0
    assert rewards.score("math", "\\boxed{12}", {"question": "q", "answer": "so\n#### 12"}) == 1.0
    assert rewards.score("arith", "7+5+0=12|>0632", {"a": 347, "b": 285}) == 1.0


# ---------------------------------------------------------------- RewardRunner


def test_runner_counts_timeouts_errors_and_crashes_and_keeps_going(user_module):
    completions = ["a", "hang", "boom", "die", "big", "b", "a"]
    examples = [{"answer": "a"}] * 6 + [{"answer": "a"}]
    with rewards.RewardRunner(f"{user_module}:make", timeout_s=1.0, workers=2) as runner:
        start = time.monotonic()
        result = runner.run(completions, examples)
        elapsed = time.monotonic() - start
        assert result.scores == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert (result.timeouts, result.errors) == (1, 3)
        assert any("RuntimeError: verifier bug" in msg for msg in result.messages)
        assert any("outside [0, 1]" in msg for msg in result.messages)
        assert any("worker process died" in msg for msg in result.messages)
        assert elapsed < 10
        again = runner.run(["a", "b"], [{"answer": "a"}, {"answer": "b"}])  # replaced workers serve on
        assert (again.scores, again.errors, again.timeouts) == ([1.0, 1.0], 0, 0)


def test_calls_queued_behind_a_crash_or_a_hang_are_scored_by_the_restarted_worker(user_module):
    """One worker holds several calls at once (`pipeline_depth`): the fault is charged to the call that caused it
    only, and the calls sent behind it are scored as if nothing happened."""
    completions = ["die", "a", "a", "hang", "a", "b"]
    with rewards.RewardRunner(f"{user_module}:make", timeout_s=1.0, workers=1) as runner:
        result = runner.run(completions, [{"answer": "a"}] * len(completions))
    assert result.scores == [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert (result.errors, result.timeouts) == (1, 1)
    assert sorted(result.failed) == [0, 3]


def test_runner_scores_math_with_its_own_deadline():
    examples = [{"prompt": "p", "answer": "5"}] * 3
    with rewards.RewardRunner("math", timeout_s=2.0, workers=1) as runner:
        result = runner.run(["\\boxed{5}", "\\boxed{9^{9^{9^{9^{9}}}}}", "5.0"], examples)
    assert result.scores == [1.0, 0.0, 1.0]
    assert result.errors == 0  # the tower is a timeout (by the runner or math-verify's alarm), never an error


def test_runner_rejects_bad_arguments(user_module):
    with pytest.raises(ConfigError, match="unknown task"):
        rewards.RewardRunner("nope")
    with pytest.raises(ValueError, match="timeout_s > 0"):
        rewards.RewardRunner("kk", timeout_s=0)
    with rewards.RewardRunner("kk", workers=1) as runner:
        with pytest.raises(ValueError, match="2 completions for 1 examples"):
            runner.run(["a", "b"], [KK])
        assert runner.run([], []).scores == []


def test_isolated_worker_reports_a_target_it_cannot_load():
    worker = isolation.IsolatedWorker("rlad_no_such_module:f")
    with pytest.raises(isolation.WorkerError, match="ModuleNotFoundError"):
        worker.start()
    assert not worker.alive


def test_isolated_worker_call_and_timeout():
    worker = isolation.IsolatedWorker("time:sleep")
    try:
        assert worker.call((0,), 30) is None
        with pytest.raises(TimeoutError):
            worker.call((30,), 0.5)
        assert not worker.alive
        with pytest.raises(isolation.WorkerError, match="TypeError"):
            worker.call(("x",), 30)  # restarted on demand
    finally:
        worker.kill()


def test_a_worker_warms_its_task_up_before_its_first_deadline(tmp_path, monkeypatch):
    """A fresh worker runs the task's warm-up (importing a verifier's libraries: sympy, reasoning-gym; over 10 s
    under load) as it starts, under the start-up deadline, not inside its first call's. The warm task scores 1.0
    only in a process that has run its warm-up."""
    from rlad_ds.isolation import IsolatedWorker

    monkeypatch.setenv("RLAD_TEST_WARM_MARK", str(tmp_path / "warmed"))
    with rewards.RewardRunner("warm_task:task", timeout_s=30.0, workers=1) as runner:
        assert runner.run(["anything"], [{"prompt": "p"}]).scores == [1.0]
    cold = IsolatedWorker("rlad_ds.rewards:score_one")  # no warm-up: the same call scores 0
    try:
        assert cold.call(("warm_task:task", None, "anything", {"prompt": "p"}), timeout_s=30) == 0.0
    finally:
        cold.kill()
