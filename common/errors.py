"""The error every config check raises: one line naming the key (or file:line), caught once at the entry
point and printed without a traceback."""


class ConfigError(ValueError):
    """A config value that cannot run: the message names the key and why."""
