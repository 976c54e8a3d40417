"""``python -m onnx_fskd ...`` runs the ``onnx-fskd`` command."""

from onnx_fskd.cli.main import main

main(prog_name="onnx-fskd")
