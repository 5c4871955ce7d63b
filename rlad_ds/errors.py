"""Errors the user can fix: each carries a one-line message that names the fix."""


class ConfigError(ValueError):
    """A configuration, file or model-directory problem, reported as one line that says what to change."""


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many consecutive non-finite steps); the message says why."""
