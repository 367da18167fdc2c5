"""The error type for settings a user got wrong, shared by the library and the command line."""


class ConfigError(ValueError):
    """A user-facing configuration mistake; the message names the key and value and what is valid."""


class CheckpointFormatError(ConfigError):
    """A model checkpoint from another library (e.g. a Hugging Face directory) that jaxtrain cannot read or
    write: the message names the path and what is wrong (a missing file or key, a shape, an unsupported model)."""
