"""How commands print: -q/-v, human output on stdout (stderr when JSON goes there), full-width tables in
pipes, JSON to stdout ('-'), and each library warning printed once."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from rich.console import Console

STDOUT = Path("-")
# Wide enough that rich never wraps a table cell or a line when stdout is a pipe or a file (rich's
# fallback there is 80 columns); lines are not padded, so nothing gets longer than its content.
_PIPE_WIDTH = 100_000
_LIBRARY_LOGGER = "onnx_fskd"


def output_options(command: Callable) -> Callable:
    """Add -q/--quiet and -v/--verbose, and route the library's log records through one-shot warnings."""

    @click.option("-v", "--verbose", is_flag=True, help="Also print progress notes (INFO) from the library.")
    @click.option("-q", "--quiet", is_flag=True, help="Print only errors (and JSON asked for with '-').")
    @functools.wraps(command)
    def wrapper(*args, quiet: bool, verbose: bool, **kwargs):
        click.get_current_context().meta["onnx_fskd.quiet"] = quiet
        with _library_logs(logging.ERROR if quiet else logging.INFO if verbose else logging.WARNING):
            return command(*args, **kwargs)

    return wrapper


def human_console(data_on_stdout: bool = False) -> Console:
    """The console for tables and notes: stdout, or stderr when stdout carries JSON; silent with -q."""
    ctx = click.get_current_context(silent=True)
    quiet = bool(ctx and ctx.meta.get("onnx_fskd.quiet"))
    return _console(sys.stderr if data_on_stdout else sys.stdout, quiet)


def warning_console() -> Console:
    """stderr for warnings; -q keeps only errors, so it silences these too."""
    return human_console(data_on_stdout=True)


def _console(stream, quiet: bool) -> Console:
    terminal = stream.isatty()
    return Console(file=stream, quiet=quiet, width=None if terminal else _PIPE_WIDTH,
                   force_terminal=None if terminal else False)


def print_json(document: dict) -> None:
    """JSON asked for with '-': on stdout (files go through onnx_fskd.outputs, staged with the rest)."""
    click.echo(json.dumps(document, indent=2) + "\n", nl=False)


class _OnceHandler(logging.Handler):
    """Print each distinct message once per command (ORT's CUDA fallback warning fires per session)."""

    def __init__(self, level: int):
        super().__init__(level)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message in self.seen:
            return
        self.seen.add(message)
        click.echo(f"{record.levelname.lower()}: {message}", err=True)


@contextlib.contextmanager
def _library_logs(level: int) -> Iterator[None]:
    """Print the library's records at ``level`` and above, once each, for one command; then put the
    logger back as it was (an embedding application or a test may watch it too)."""
    logger = logging.getLogger(_LIBRARY_LOGGER)
    saved = logger.level, logger.propagate
    handler = _OnceHandler(level)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # a root handler (logging.basicConfig somewhere) would print it twice
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved


def is_stdout(path: Path | None) -> bool:
    return path is not None and path == STDOUT
