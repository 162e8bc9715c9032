"""Errors a user can act on: each message says what was wrong and how to fix it.

All derive from ``KVPressExtError`` (a ``ValueError``), so command-line entry points can catch one
type, print the message on one line and exit with status 2 instead of showing a traceback.
"""


class KVPressExtError(ValueError):
    """Base class for every error kvpress_ext raises on bad input."""


class UnknownPressError(KVPressExtError, KeyError):
    """A press name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class PressParameterError(KVPressExtError):
    """A parameter the press does not have, or a value outside its valid range."""


class UnsupportedModelError(KVPressExtError):
    """A model no adapter knows how to drive."""


class CacheFormatError(KVPressExtError):
    """A saved cache that is missing, truncated, from another model or from a newer format."""


class PressInputError(PressParameterError, AssertionError):
    """A press refused its input (kvpress checks inputs with ``assert``): names the press and what to change.

    Also an ``AssertionError``, so code that handles kvpress's own assertions keeps working."""


class PressSkippedWarning(UserWarning):
    """A press could not compress an input (e.g. shorter than its window) and left the cache as it was."""


class NoCompressionWarning(UserWarning):
    """A press configured so that it removes nothing (``compression_ratio=0``)."""
