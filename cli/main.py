"""The `onnx-fskd` command: parses arguments and prints; all work happens in onnx_fskd."""

from __future__ import annotations

import click

from onnx_fskd import __version__

from .eval_cmd import eval_command
from .fit_cmd import fit_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnx-fskd")
def main() -> None:
    """Repair compressed ONNX models with few-sample knowledge distillation (FSKD)."""


main.add_command(fit_command)
main.add_command(eval_command)

if __name__ == "__main__":
    main()
