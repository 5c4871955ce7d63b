"""Errors the user can fix: each carries a one-line message that names the fix."""


class ConfigError(ValueError):
    """A configuration, file or model-directory problem, reported as one line that says what to change."""
