"""Errors users see. One line, naming the field and the fix."""


class LingConfigError(ValueError):
    """A user-supplied configuration is invalid. The message names the field and how to fix it."""
