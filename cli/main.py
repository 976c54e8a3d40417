"""The `onnx-fskd` command: parses arguments and prints; all work happens in onnx_fskd.

Commands are imported only when run (or asked for their own --help): the library pulls in onnx,
onnxruntime, scipy and onnx-graphsurgeon, which would make `onnx-fskd --help` take a second.
"""

from __future__ import annotations

import importlib

import click

from onnx_fskd import NO_ONNXRUNTIME, __version__

from .usage import one_line_usage_errors

# name → (module, attribute, one-line help shown by `onnx-fskd --help` without importing the module;
# tests/test_packaging.py checks each line against the command's own docstring).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "fit": ("fit_cmd", "fit_command",
            "Recover a compressed student of TEACHER.onnx from a few unlabeled samples."),
    "eval": ("eval_cmd", "eval_command",
             "Evaluate MODEL.onnx on the --data samples: accuracy (with labels), agreement..."),
    "prune": ("prune_cmd", "prune_command",
              "Remove --ratio of the output channels of MODEL.onnx's Conv/Gemm/MatMul layers..."),
    "decompose": ("decompose_cmd", "decompose_command",
                  "Replace each Conv (group=1), Gemm and MatMul of MODEL.onnx by a low-rank..."),
}


class LazyGroup(click.Group):
    """A group whose commands load on first use, and which turns a missing onnxruntime into one line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        return getattr(importlib.import_module(f"{__package__}.{module}"), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, _, short) in COMMANDS.items()])

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return one_line_usage_errors(ctx, lambda: super(LazyGroup, self).parse_args(ctx, args))

    def invoke(self, ctx: click.Context):
        try:
            return one_line_usage_errors(ctx, lambda: super(LazyGroup, self).invoke(ctx))
        except ModuleNotFoundError as exc:
            if exc.name != "onnxruntime":
                raise
            click.echo(f"error: {NO_ONNXRUNTIME}", err=True)
            raise click.exceptions.Exit(1) from None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnx-fskd")
def main() -> None:
    """Repair compressed ONNX models with few-sample knowledge distillation (FSKD)."""


if __name__ == "__main__":
    main()
