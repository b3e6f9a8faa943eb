"""The error types every layer raises, each with a one-line message naming the problem and the fix: a user
error (the CLI's exit code 2) and a run directory that could not be written (exit code 4).

A leaf module, so that the config, the architecture methods and the adapters can all raise
them without importing each other.
"""


class ConfigError(ValueError):
    """A user error in a config file or override; the message is one line."""


class RunWriteError(RuntimeError):
    """The run directory could not be written for want of space or by a failing device (the CLI's exit code 4);
    what was there is intact and nothing was left half-written. The message is one line."""
