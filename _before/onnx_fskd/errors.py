"""Error types that the CLI turns into one line and an exit code."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


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


def raises_fskd_error(function: F) -> F:
    """Let ``function`` fail only with FskdError for what as_fskd_error recognises (the Python API's
    promise; the CLI prints the same message as its one 'error:' line)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except FskdError:
            raise
        except Exception as exc:
            error = as_fskd_error(exc)
            if error is None:
                raise
            raise error from exc

    return wrapper  # type: ignore[return-value]
