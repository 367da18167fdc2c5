"""The error type for settings a user got wrong, shared by the library and the command line."""


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the key and value and what is valid."""
