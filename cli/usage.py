"""Click's usage errors in the tool's own style: one 'error: ...' line and exit code 2, like every other
error (click's default is a usage line, a hint and the message). Imports nothing but click, so the
group can use it without slowing `onnx-fskd --help`."""

from __future__ import annotations

from collections.abc import Callable

import click

# `onnx-fskd` alone prints the help through this UsageError subclass: that one stays as click shows it.
_HELP_ERRORS = tuple(filter(None, [getattr(click.exceptions, "NoArgsIsHelpError", None)]))


class _OneLineUsageError(click.UsageError):
    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


def one_line_usage_errors(ctx: click.Context, call: Callable):
    """Run ``call``, turning click's usage errors into the tool's one-line style."""
    try:
        return call()
    except click.UsageError as exc:
        if isinstance(exc, (_OneLineUsageError, *_HELP_ERRORS)):
            raise
        hint = f" (see {ctx.command_path} --help)" if ctx.command_path else ""
        raise _OneLineUsageError(exc.format_message() + hint, ctx) from None
