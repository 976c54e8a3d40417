"""The `onnx-fskd` command: parses arguments and prints; all work happens in onnx_fskd."""

from __future__ import annotations

import click

from onnx_fskd import __version__

from .decompose_cmd import decompose_command
from .eval_cmd import eval_command
from .fit_cmd import fit_command
from .prune_cmd import prune_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnx-fskd")
def main() -> None:
    """Repair compressed ONNX models with few-sample knowledge distillation (FSKD)."""


main.add_command(fit_command)
main.add_command(eval_command)
main.add_command(prune_command)
main.add_command(decompose_command)

if __name__ == "__main__":
    main()
