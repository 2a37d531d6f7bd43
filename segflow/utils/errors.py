"""The one error a bad config raises: every layer may raise it, so it sits at the bottom."""


class ConfigError(ValueError):
    """A config that cannot run; the message names every wrong key path."""
