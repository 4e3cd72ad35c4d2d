"""The configuration's error and warning: a leaf module, so every layer can raise them without
importing the config."""


class ConfigError(ValueError):
    """A bad configuration: raised before any work starts, naming the key or file."""


class ConfigWarning(UserWarning):
    """A legal but suspicious setting (e.g. warmup longer than the stage): reported, not refused."""

