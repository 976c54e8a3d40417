"""Error types that the CLI turns into one line and an exit code."""

from __future__ import annotations


class FskdError(Exception):
    """A failure the user can act on (bad model, bad samples, unwritable output): exit code 1."""


class UsageError(FskdError):
    """The command line itself is wrong (output equals an input, existing output without --force): exit code 2."""


def as_fskd_error(exc: BaseException) -> FskdError | None:
    """The one-line FskdError for a failure from below the tool (ONNX Runtime refusing to run a model on
    the samples, an OSError while reading or writing), or None for anything else (a bug: let it show)."""
    if type(exc).__module__.startswith("onnxruntime"):  # its pybind11 errors share no base class but Exception
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return FskdError(f"onnxruntime could not run the model on these samples ({first}); check that they "
                         f"suit the model: value ranges such as token ids, shapes and dtypes")
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return FskdError(f"{where}{exc.strerror or exc or type(exc).__name__}")
    return None
