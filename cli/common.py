"""Pieces shared by the commands: image-folder options and one-line error reporting."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import click

from onnx_fskd.data import ImageOptions
from onnx_fskd.errors import FskdError, UsageError, as_fskd_error
from onnx_fskd.memory import parse_size

from .usage import one_line_usage_errors


class ImageSize(click.ParamType):
    """HxW, or one number for square images."""

    name = "HxW"

    def convert(self, value, param, ctx) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(value))
        if not match or int(match[1]) == 0 or (match[2] and int(match[2]) == 0):
            self.fail(f"expected HxW such as 224x224 (or 224 for square images), got {value!r}", param, ctx)
        return int(match[1]), int(match[2] or match[1])


class FloatList(click.ParamType):
    """Comma-separated floats, one per channel or one for all."""

    name = "FLOATS"

    def convert(self, value, param, ctx) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(float(part) for part in str(value).split(","))
        except ValueError:
            numbers = (math.nan,)
        if not all(math.isfinite(n) for n in numbers):
            self.fail(f"expected comma-separated finite numbers such as 0.485,0.456,0.406, got {value!r}", param, ctx)
        return numbers


class InputShape(click.ParamType):
    """NAME:D,D,... (onnxsim's --overwrite-input-shape) or NAME:[D,D,...] (Polygraphy's --input-shapes);
    several may share one value, separated by spaces."""

    name = "NAME:DIMS"

    def convert(self, value, param, ctx) -> tuple[tuple[str, tuple[int, ...]], ...]:
        if isinstance(value, tuple):
            return value
        parsed = []
        for item in str(value).split():
            match = re.fullmatch(r"(.+):\[?\s*(\d+(?:\s*,\s*\d+)*)\s*\]?", item)
            if not match:
                self.fail(f"expected NAME:DIM,DIM,... such as input_ids:1,128, got {item!r}", param, ctx)
            parsed.append((match[1], tuple(int(d) for d in match[2].split(","))))
        return tuple(parsed)


def input_shapes_option(command: Callable) -> Callable:
    """--input-shapes, repeatable: fixes dynamic input sizes (sequence length, image size) for MAC counts."""
    return click.option("--input-shapes", "input_shapes", type=InputShape(), multiple=True, metavar="NAME:D,D,...",
                        help="Input shapes for the MAC counts, e.g. input_ids:1,128 (repeat or space-separate for "
                             "several inputs); needed when the sequence length or image size is dynamic.")(command)


def build_input_shapes(values: tuple[tuple[tuple[str, tuple[int, ...]], ...], ...]) -> dict[str, tuple[int, ...]] | None:
    """The --input-shapes values as {name: dims}; a name given twice is a usage error."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, dims in (pair for value in values for pair in value):
        if name in shapes:
            raise UsageError(f"--input-shapes: '{name}' is given twice")
        shapes[name] = dims
    return shapes or None


def image_options(command: Callable) -> Callable:
    """Add the options that turn a folder of images into the model's input tensor (see data.ImageOptions)."""
    defaults = ImageOptions()
    options = [
        click.option("--image-size", type=ImageSize(), default=None, metavar="HxW",
                     help="Centre-crop images to HxW (default: the model's input size)."),
        click.option("--resize", type=click.IntRange(min=1), default=None, metavar="PIXELS",
                     help="Resize each image's shorter side to PIXELS before the crop, keeping its aspect "
                          "(default: just enough to cover the crop; 256 with a 224 crop is ImageNet's)."),
        click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default=defaults.channel_order,
                     show_default=True, help="Colour channel order the model expects."),
        click.option("--mean", type=FloatList(), default=None, metavar="M[,M,...]",
                     help="Per-channel mean subtracted after scaling (default 0, with a warning)."),
        click.option("--std", type=FloatList(), default=None, metavar="S[,S,...]",
                     help="Per-channel std dividing after the mean (default 1)."),
        click.option("--scale", type=FiniteFloat(), default=None,
                     help=f"Pixel multiplier applied first (default 1/255 = {defaults.scale:.6g})."),
        click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default=defaults.layout, show_default=True,
                     help="Channel layout of the model's image input."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def build_image_options(image_size: tuple[int, int] | None, resize: int | None, channel_order: str,
                        mean: tuple[float, ...] | None, std: tuple[float, ...] | None, scale: float | None,
                        layout: str) -> ImageOptions:
    """ImageOptions from the parsed options; anything not given keeps the dataclass default."""
    if std is not None and 0.0 in std:
        raise UsageError("--std values must be non-zero")
    given = {"size": image_size, "resize": resize, "channel_order": channel_order, "mean": mean, "std": std,
             "scale": scale, "layout": layout}
    return ImageOptions(**{key: value for key, value in given.items() if value is not None})


def reports_errors(command: Callable) -> Callable:
    """Print an FskdError (or an onnxruntime or OS error) as one 'error: ...' line on stderr and exit 1
    (2 for usage errors), no traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as exc:
            error = exc if isinstance(exc, FskdError) else as_fskd_error(exc)
            if error is None:
                raise
            click.echo(f"error: {error}", err=True)
            raise click.exceptions.Exit(2 if isinstance(error, UsageError) else 1) from None

    return wrapper


class OneLineErrors(click.Command):
    """A command whose argument errors print like its own errors (click's default is three lines)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return one_line_usage_errors(ctx, lambda: super(OneLineErrors, self).parse_args(ctx, args))


class ByteSize(click.ParamType):
    """A size in bytes, written 512M, 1.5G or 4096 (memory.parse_size)."""

    name = "size"

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except FskdError:
            self.fail(f"{value!r} is not a size such as 512M, 1.5G or 4096 (bytes)", param, ctx)


class FiniteFloat(click.ParamType):
    """A float that must be finite (and, optionally, within bounds): nan or inf would silently turn the
    computation it feeds into a no-op."""

    name = "float"

    def __init__(self, low: float | None = None, high: float | None = None, high_open: bool = False):
        self.low, self.high, self.high_open = low, high, high_open

    def convert(self, value, param, ctx) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and number < self.low:
            self.fail(f"{number:g} is below {self.low:g}", param, ctx)
        if self.high is not None and (number > self.high or (self.high_open and number == self.high)):
            self.fail(f"{number:g} must be {'below' if self.high_open else 'at most'} {self.high:g}", param, ctx)
        return number
