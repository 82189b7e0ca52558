"""Exception types. Each names the culprit (key, field, offset) in its message.

The CLI maps :class:`UsageError` subclasses to exit code 2 and one line of
text; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class HpcflError(Exception):
    """Base class of every error hpcfl raises on purpose."""


class UsageError(HpcflError):
    """Bad input from the user: the CLI prints one line and exits with 2."""


class ConfigError(UsageError, ValueError):
    """An invalid job file, override or codec config.

    ``key`` is the dotted path of the offending entry (``train.lr``).
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


class UnknownCodecError(ConfigError):
    """A codec id that is neither registered nor a recipe."""

    def __init__(self, key: str, codec_id: object, known: list[str]):
        self.codec_id = codec_id
        shown = ", ".join(sorted(known))
        super().__init__(key, f"unknown codec id {codec_id!r}; known: {shown}")


class WireFormatError(UsageError, ValueError):
    """A malformed or mismatched message. ``field`` and ``offset`` locate it."""

    def __init__(self, field: str, offset: int, message: str):
        self.field = field
        self.offset = offset
        super().__init__(f"malformed message at byte {offset} ({field}): {message}")


class StateMismatchError(HpcflError):
    """Client and root copies of shared codec state have drifted apart."""


class WorldSizeError(UsageError, RuntimeError):
    """The MPI world does not fit the job (too small, or a silent singleton)."""


class DataError(UsageError):
    """A data set is missing or its files are not in the expected format."""


class NumericalFault(HpcflError):
    """A client update holds NaN or Inf (run.nonfinite = "stop")."""


class RankTimeout(HpcflError):
    """A rank waited longer than run.timeout for another: the job is declared hung."""


class ResultsWriteError(HpcflError):
    """The run file could not be written (disk full, permissions); earlier rounds are intact."""
