"""`onnx-fskd decompose`: low-rank factorisation of Conv/Gemm/MatMul layers, writing the map `fit` reads."""

from __future__ import annotations

from pathlib import Path

import click

from onnx_fskd.compress import decompose_model
from onnx_fskd.compress.decompose import check_decompose_options
from onnx_fskd.model_io import load_model, write_model
from onnx_fskd.outputs import OutputSet, protected_files
from onnx_fskd.provenance import stamp_producer

from onnx_fskd.costs import check_input_shapes

from .common import FiniteFloat, OneLineErrors, build_input_shapes, input_shapes_option, reports_errors
from .output import output_options
from .prune_cmd import print_summary


@click.command("decompose", cls=OneLineErrors)
@click.argument("model_path", metavar="MODEL.onnx", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--rank-ratio", type=FiniteFloat(), default=None, help="Rank as a fraction of each layer's full rank, in (0, 1].")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the decomposed student.")
@click.option("--method", type=click.Choice(["svd", "tucker2", "spatial", "auto"]), default="auto", show_default=True,
              help="Conv factorisation: k×k→1×1 SVD, Tucker-2 (1×1, k×k, 1×1), spatial k×1→1×k, or per layer "
                   "the one with the fewest MACs. Gemm/MatMul always become two low-rank products.")
@click.option("--energy", type=FiniteFloat(), default=None,
              help="Instead of --rank-ratio: keep singular values up to this fraction of the squared energy.")
@click.option("--keep-ends/--decompose-ends", default=True, show_default=True,
              help="Leave the layers that read the graph input or write the graph output unfactorised: they save "
                   "few MACs, and no later point can correct a low-rank output layer.")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@input_shapes_option
@output_options
@reports_errors
def decompose_command(model_path: Path, rank_ratio: float | None, output_path: Path, method: str,
                      energy: float | None, keep_ends: bool, force: bool, input_shapes) -> None:
    """Replace each Conv (group=1), Gemm and MatMul of MODEL.onnx by a low-rank chain whose last op keeps the
    layer's name and output, skipping layers where that would not cut MACs, and write -o with the map that
    `onnx-fskd fit` uses."""
    check_decompose_options(rank_ratio, method, energy)
    shapes = build_input_shapes(input_shapes)
    outputs = OutputSet(protected_files([model_path]), force)
    outputs.claim(output_path, "-o")
    model = load_model(model_path)
    check_input_shapes(model, shapes)
    result = decompose_model(model, rank_ratio=rank_ratio, method=method, energy=energy, keep_ends=keep_ends,
                             input_shapes=shapes)
    with outputs.commit_on_success():
        outputs.stage(output_path, lambda path: write_model(stamp_producer(result.model), path, like=model))
    print_summary(model, result, "decomposition", "rank", output_path, result.folded_nodes, shapes)
