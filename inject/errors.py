"""Errors that the CLI reports as one clear message (no traceback) and a non-zero exit."""


class InjectError(Exception):
    """A problem with the user's input or configuration: the message names the file, line or key."""


class ConfigError(InjectError):
    """A configuration value that is missing, unknown or of the wrong type/range."""
