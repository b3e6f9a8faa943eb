"""The user-error type every layer raises: one line naming the problem and the fix (the CLI's exit code 2).

A leaf module, so that the config, the architecture methods and the adapters can all raise
it without importing each other.
"""


class ConfigError(ValueError):
    """A user error in a config file or override; the message is one line."""
