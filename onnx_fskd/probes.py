"""Statistics inside ONNX Runtime: a small graph per point that maps the point's input (and the
teacher's tensors) to the point's least-squares sums, so only C×C matrices leave the runtime.

The graph holds a statistics-only copy of the point's op and affine chain (the real op keeps its
fusions in the segment that runs it, with the fitted Q already folded into its weights), the target
(teacher output on the kept channels, or the residual sum target), and the sums of ``Y`` and of the
residual ``D = T − Y`` per diagonal block:

- a per-channel shift ``s`` (the batch mean) is subtracted before any product, and the shifted sums
  come back per sample, so float32 only ever sums centred values over one sample's positions;
- the host adds the shift terms back and accumulates across batches in float64, then turns the ``D``
  sums into the ``T`` sums that ``GramStats`` keeps. Working with ``D``
  keeps the float32 rounding proportional to the student's error, not to the activations, which is
  what the held-out guard needs when the student is already close.

An optional 0/1 row weight (``attention_mask`` for token rows) drops padded rows from every sum; on
CUDA a 0/1 weight per sample also drops the samples that pad every batch to one shape
(runtime.padded_rows). For the full solver the sums are those of the op's input patches (im2col as
one grouped conv with one-hot kernels) against the target instead. A conv's sums may read every s-th row
and column of its output only (sampling.py): the copy of the op then runs with s times its strides. A
wide input (an expansion's output) is not fed but recomputed by a prefix of the student inside the probe
(SegmentRunner.side_graph)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .graph import GraphIndex
from .ops.base import attribute, explicit_pads
from .points import CorrectionPoint
from .runtime import make_session, one_batch_shape, pad_batch, rows_within_arena
from .sampling import grid_node, strided_copies, strided_tail
from .solver_policy import patch_features
from .stats import GramStats, MappedGramStats

_X, _T, _T_SKIP, _S_SKIP, _MASK = "fskd/x", "fskd/t", "fskd/t_skip", "fskd/s_skip", "fskd/mask"
# Positions per sample from which per-sample Gram products beat one relayout into a long row axis.
# Probe runs of 64 rows, 2-core CPU, per-sample products: 14×14 maps 15–25 % faster (MobileNet-like ir8.expand
# 35.3 → 28.1 ms, ResNet-18 s2b1.c2 91.4 → 84.6 ms), 28×28 10–15 %; 7×7 maps slower (the 1280-channel
# head 32.8 → 46.5 ms, ResNet-18 s3b1.c1 96.7 → 120.0 ms). Re-selection's feature Grams use the same bound.
PER_SAMPLE_POSITIONS = 128
_CHEAP_COPY = 16  # multiply-adds per output element below which the probe's copy of the op is cheap anyway
# x: the point's output y, its input when y = A·x + b is cheaper to rebuild on the host (input_map), or
# its input patches for the full solver.
# The probe's outputs: shape, rows, sx, Sx, Gxx (or its upper blocks Gxx/i/j), sd, Sd, Gxd, Qd; s· the
# per-channel shift, S· per-sample sums of shifted values, G·· Gram products, Qd Σ(d − s_d)².


@dataclass(frozen=True)
class ProbeFeeds:
    """The cached tensors a probe reads, by role; skips and mask only where the probe was built with them.
    ``x``: the point's input, or for a probe with a prefix the prefix's inputs by name."""

    x: np.ndarray | dict[str, np.ndarray]
    teacher: np.ndarray
    teacher_skip: np.ndarray | None = None
    student_skip: np.ndarray | None = None
    mask: np.ndarray | None = None

    def window(self, rows: slice) -> dict[str, np.ndarray]:
        named = {_T: self.teacher, _T_SKIP: self.teacher_skip, _S_SKIP: self.student_skip, _MASK: self.mask}
        named |= self.x if isinstance(self.x, dict) else {_X: self.x}
        return {name: value[rows] for name, value in named.items() if value is not None}


def probe_blocker(point: CorrectionPoint, graph: GraphIndex) -> str | None:
    """Why a point's statistics cannot be computed in-graph (the host path then takes it), or None."""
    nodes = _point_nodes(point, graph)
    tensors = {point.input} | {n.output[0] for n in nodes}
    for node in nodes:
        if any(i and i not in tensors and not graph.is_constant(i) for i in node.input):
            return f"{node.name} reads a computed tensor besides the point's input"
    weight = graph.constant(point.weight)
    if weight.dtype != np.float32:
        return f"weights are {weight.dtype}, not float32"
    if point.channel_axis != 1 and point.groups != 1:
        return "grouped channels-last op"
    if point.channel_axis not in (1, point.rank - 1):
        return "channel axis neither first nor last"
    return None


def probe_reads_output(point: CorrectionPoint, graph: GraphIndex, stride: int) -> bool:
    """Whether a q point's statistics should read its output, computed (uncorrected) by the segment and
    corrected afterwards by applying Q to it, rather than recompute the op from its input inside the
    probe: for a channels-first conv whose output is no larger than its input and whose copy in the probe
    would cost more than twice applying Q and more than 2·_CHEAP_COPY multiply-adds per output element
    (9·C_in for a 3×3 conv on a map too small to sample, against C for Q). Q is applied on the host
    (fit_adapter's way), so large sampled maps and depthwise convs (9 per output) stay in the probe.
    ResNet-18, 256 samples: probes 5.2 s → 2.2 s, the fit 25.2 s → 23.0 s."""
    if point.op_type != "Conv" or point.channel_axis != 1 or point.rank != 4:
        return False
    size_in, size_out = graph.per_sample(point.input), graph.per_sample(point.output)
    if size_in is None or size_out is None:
        return False
    macs_per_output = int(np.prod(graph.shapes[point.weight][1:]))
    return size_out <= size_in and macs_per_output / stride ** 2 > 2 * max(point.group_size, _CHEAP_COPY)


def input_map(point: CorrectionPoint, graph: GraphIndex) -> tuple[np.ndarray, np.ndarray] | None:
    """(A, b) with y = A·x + b per position, for a point whose output statistics are cheaper to rebuild
    from its input's (a 1×1 expansion conv, a widening MatMul: C_in < C_out); else None."""
    node = graph.node_by_name[point.name]
    weight = graph.constant(point.weight)
    if point.op_type == "Conv":
        if weight.shape[2:] != (1, 1) or point.groups != 1 or any(
                a.name in ("strides", "pads") and any(v != (1 if a.name == "strides" else 0) for v in a.ints)
                for a in node.attribute):
            return None
        bias = graph.constant(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else 0.0
    elif point.op_type == "MatMul":
        bias = 0.0
    else:
        return None
    major = point.op.to_output_major(node, weight).astype(np.float64).reshape(point.channels, -1)
    if major.shape[1] >= point.channels:
        return None
    scale, shift = np.ones(point.channels), np.zeros(point.channels)
    for step in point.chain:
        scale, shift = scale * step.scale, shift * step.scale + step.shift
    return scale[:, None] * major, scale * bias + shift


class StatsProbe:
    """The statistics graph of one point and its ORT session.

    With ``full`` = (A, b), y = A·x + b per row for the full solver (correct.FullForm.linear_map), the
    sums are those of [x 1] against the target, x the op's input patches (a Conv) or input rows (a Gemm
    or MatMul); otherwise those of [y 1], y the op's output, computed in the probe from the op's input,
    or with ``fed_output`` fed as ProbeFeeds.x."""

    def __init__(self, point: CorrectionPoint, graph: GraphIndex, kept: np.ndarray, teacher_channels: int,
                 providers: list[str], teacher_skip: bool = False, student_skip: bool = False,
                 masked: bool = False, stride: int = 1, full: tuple[np.ndarray, np.ndarray] | None = None,
                 prefix: onnx.ModelProto | None = None, fed_output: bool = False):
        self.point = point
        self.full = full
        self.via_input = None if full is not None or fed_output else input_map(point, graph)
        source = "patches" if full is not None else "fed" if fed_output else \
            "input" if self.via_input is not None else "output"
        # Every batch padded to one shape, the padding weighted 0, where the probe holds a conv: decided by the
        # providers asked for, before the session exists (one that falls back to the CPU pads too, harmlessly).
        self.padded = one_batch_shape(providers) and _holds_conv(point, graph, source, prefix)
        weighted = masked or self.padded
        self.shifted = shifted_geometry(point, graph, stride) if source == "patches" and not weighted else None
        self.model = _build(point, graph, kept, teacher_channels, teacher_skip, student_skip, weighted, source, stride,
                            prefix, self.shifted)
        self.session = make_session(self.model, providers, exact=True)
        self.outputs = [output.name for output in self.model.graph.output]
        # Rows per run: what a batch keeps in the arena is at most the prefix's tensors and the point's output.
        per_sample = graph.known_per_sample([point.output] + [
            output for node in (prefix.graph.node if prefix is not None else []) for output in node.output if output])
        self.max_rows = rows_within_arena(self.session, 4 * per_sample, sys.maxsize)

    def accumulate(self, feeds: ProbeFeeds, parts: list[slice], batch_size: int
                   ) -> list[GramStats | MappedGramStats]:
        """The sums of each part of the samples (fit rows, held-out rows), batches never straddling parts:
        MappedGramStats for a point summed from its input (via_input), else GramStats."""
        results = []
        batch_size = min(batch_size, self.max_rows)
        rows = min(batch_size, max(part.stop - part.start for part in parts))  # of every batch, when padded
        for part in parts:
            sums = _Sums(self.shifted)
            for start in range(part.start, part.stop, batch_size):
                window = slice(start, min(start + batch_size, part.stop))
                batch = feeds.window(window) if not self.padded else _padded(feeds.window(window), rows)
                values = dict(zip(self.outputs, self.session.run(self.outputs, batch)))
                sums.add(_assembled(values) if "Gxx/0/0" in values else values)
            results.append(sums.patch_stats(*self.full) if self.full is not None
                           else sums.gram_stats(self.point, self.via_input))
        return results


def _holds_conv(point: CorrectionPoint, graph: GraphIndex, source: str, prefix: onnx.ModelProto | None) -> bool:
    """Whether a probe's graph holds a conv: only then is a new batch shape worth padding away (on CUDA,
    the conv's cuDNN set-up repeats for each shape, while padding copies the whole batch on the host:
    H100, ResNet-18 `q`, whose fed probes hold no conv: statistics 1.0 s unpadded, 1.5–1.8 s padded).
    A patch probe's convs are not counted: a padded batch could not use the shifted-product Gram."""
    copies_conv = point.op_type == "Conv" and source in ("output", "input")
    return copies_conv or prefix is not None and any(node.op_type == "Conv" for node in prefix.graph.node)


def _padded(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """A probe's batch padded to ``rows`` samples (the last one repeated), with a row weight that is 0 on
    the padding: the token mask where there is one, else one weight per sample."""
    real = len(next(iter(batch.values())))
    mask = batch.get(_MASK, np.ones((real, 1), np.int64))
    if real == rows:
        return {**batch, _MASK: mask}
    padded = pad_batch({name: value for name, value in batch.items() if name != _MASK}, rows)
    padded[_MASK] = np.concatenate([mask, np.zeros((rows - real,) + mask.shape[1:], mask.dtype)])
    return padded


@dataclass(frozen=True)
class _BatchShift:
    """One batch's row count, shifts (sx, sd) and centred sums (Sx, Sd), per block."""

    n: float
    sx: np.ndarray
    Sx: np.ndarray
    sd: np.ndarray
    Sd: np.ndarray


class _Sums:
    """Float64 running sums over batches, in the probe's own terms: n, Σx, Σd, Σx·xᵀ, Σx·dᵀ, Σd².

    Each batch's products come centred on that batch's shifts (probes' ``centred``); the shift terms
    (rank one per batch) are added back once for all batches, as one product over the stacked shifts:
    per batch they were three F×F float64 temporaries, 3.5 s of a ResNet-18 ``auto`` fit."""

    def __init__(self, shifted: tuple[int, int, int] | None = None) -> None:
        self.n, self.dd = 0.0, 0.0
        self.x = self.d = 0.0
        self._shifted = _ShiftedGram(*shifted) if shifted is not None else None  # Σx·xᵀ from shifted products
        self._gxx: np.ndarray | None = None  # Σ of the batches' centred products, float64
        self._gxd: np.ndarray | None = None
        self._shifts: list[_BatchShift] = []

    def add(self, v: dict[str, np.ndarray]) -> None:
        """One batch: its centred float32 products summed in float64, its shifts kept for ``xx``/``xd``."""
        shape = v["shape"]  # (N, B, k, L) of the planes
        n = float(v["rows"]) if v["rows"] >= 0 else float(shape[0] * shape[3])
        Sx, Sd, Qd = (v[name].astype(np.float64).sum(axis=0) for name in ("Sx", "Sd", "Qd"))  # (B, k), (B, m)
        sx, sd = v["sx"].astype(np.float64).reshape(Sx.shape), v["sd"].astype(np.float64).reshape(Sd.shape)
        gxd = _per_batch(v["Gxd"], (Sx.shape[0], Sx.shape[1], Sd.shape[1]))
        self._gxd = gxd if self._gxd is None else np.add(self._gxd, gxd, out=self._gxd)
        if self._shifted is not None:
            self._shifted.add(v, int(shape[0]))
        else:
            gxx = _per_batch(v["Gxx"], (Sx.shape[0], Sx.shape[1], Sx.shape[1]))
            self._gxx = gxx if self._gxx is None else np.add(self._gxx, gxx, out=self._gxx)
        self._shifts.append(_BatchShift(n, sx, Sx, sd, Sd))
        self.x = self.x + n * sx + Sx
        self.d = self.d + n * sd + Sd
        self.dd += float(np.sum(Qd + 2.0 * sd * Sd + n * sd * sd))
        self.n += n

    @property
    def xx(self) -> np.ndarray:
        """Σx·xᵀ per block from the batches' centred products (a shifted-product Gram: xx_into)."""
        return self._gxx + self._shift_terms("sx", "Sx", "sx", "Sx")

    def xx_into(self, out: np.ndarray) -> None:
        """Σx·xᵀ (one block) written into ``out``."""
        if self._shifted is not None:
            self._shifted.gram(out)
        else:
            out[...] = self.xx[0]

    @property
    def xd(self) -> np.ndarray:
        return self._gxd + self._shift_terms("sx", "Sx", "sd", "Sd")

    def _shift_terms(self, a: str, sums_a: str, b: str, sums_b: str) -> np.ndarray:
        """Σ over batches of s·Σbᵀ + Σa·uᵀ + n·s·uᵀ (s, u: the batch's shifts ``a`` and ``b``; Σa, Σb: its
        centred sums ``sums_a``, ``sums_b``), per block: with s stacked as (B, k, batches), one batched
        product for each term."""
        stack = lambda field: np.stack([getattr(shift, field) for shift in self._shifts], axis=-1)  # noqa: E731
        n = np.array([shift.n for shift in self._shifts])
        s, u = stack(a), stack(b)
        return s @ np.swapaxes(stack(sums_b), -1, -2) + stack(sums_a) @ np.swapaxes(u, -1, -2) \
            + (s * n) @ np.swapaxes(u, -1, -2)

    def gram_stats(self, point: CorrectionPoint, via_input: tuple[np.ndarray, np.ndarray] | None
                   ) -> GramStats | MappedGramStats:
        """[Y 1]ᵀ[Y 1], [Y 1]ᵀT and ΣT² with T = D + Y; with ``via_input`` = (A, b), y = A·x + b, the
        sums stay in x's coordinates (MappedGramStats)."""
        if via_input is not None:
            if not self.n:
                return MappedGramStats.empty(*via_input)
            return MappedGramStats(*via_input, self.xx[0], self.xd[0], self.x[0], self.d[0], self.dd, self.n)
        if not self.n:
            return GramStats.empty(point.channels, blocks=point.groups)
        return GramStats.from_residual_sums(self.xx, self.xd, self.x, self.d, self.dd, self.n)

    def patch_stats(self, a: np.ndarray, b: np.ndarray) -> GramStats:
        """[X 1]ᵀ[X 1], [X 1]ᵀT and ΣT² with T = D + Y and y = A·x + b, x in A's feature order. Σx·xᵀ is
        written straight into the system: ResNet-18's 4608-feature points had it gathered (np.ix_, 0.4 s)
        and copied (170 MB) twice per point."""
        channels, features = a.shape
        if not self.n:
            return GramStats.empty(features, channels)
        n, xd, x, d = self.n, self.xd[0], self.x[0], self.d[0]
        ax = a @ x
        zz = np.empty((1, features + 1, features + 1))
        xx = zz[0, :features, :features]
        self.xx_into(xx)
        zz[0, :features, features] = zz[0, features, :features] = x
        zz[0, features, features] = n
        zt = np.empty((1, features + 1, channels))
        xx_at = xx @ a.T  # (F, C): one BLAS product serves both Σx·yᵀ and tr(A·Σxxᵀ·Aᵀ)
        zt[0, :features] = xd + xx_at + np.outer(x, b)
        zt[0, features] = d + ax + n * b
        yd = float(np.einsum("ij,ji->", a, xd)) + float(b @ d)
        yy = float(np.einsum("ij,ji->", a, xx_at)) + 2.0 * float(b @ ax) + n * float(b @ b)
        return GramStats(zz, zt, self.dd + 2.0 * yd + yy, int(round(n)))


def _per_batch(product: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A batch's float32 product as ``shape`` in float64; one that came per sample (a leading sample axis:
    the depthwise probes) summed over its samples here."""
    product = product.astype(np.float64)
    if product.size == np.prod(shape):
        return product.reshape(shape)
    return product.reshape((-1,) + shape).sum(axis=0)


def _weight_order_blocks(matrix: np.ndarray, offsets: int, channels: int) -> np.ndarray:
    """A (C, K, C, K) view of a channel-major (C·K, C·K) ``matrix`` (rows c·K + k, the weight's feature
    order; ``matrix`` may be a strided sub-matrix): [:, a, :, b] is the C×C block of offsets a and b."""
    rows, cols = matrix.strides
    return np.lib.stride_tricks.as_strided(matrix, (channels, offsets, channels, offsets),
                                           (offsets * rows, rows, offsets * cols, cols))


def _gram_blocks(features: int) -> list[int] | None:
    """Bounds of the diagonal blocks a wide Gram is computed in (upper blocks only: (B+1)/2B of the
    products, 56–75 % for 8 to 2 blocks), or None below 512 features (one product)."""
    if features < 512:
        return None
    return [int(b) for b in np.linspace(0, features, min(8, features // 256) + 1)]


def shifted_geometry(point: CorrectionPoint, graph: GraphIndex, stride: int) -> tuple[int, int, int] | None:
    """(C, H, W) of a point whose patch Gram can be put together from shifted channel products of its
    input (_ShiftedGram): a 3×3 conv with pads 1, strides and dilations 1 and one group, read on every
    position, its input's and output's sizes known (at least 3×3); else None."""
    node = graph.node_by_name[point.name]
    shape = graph.shapes.get(point.input)
    if point.op_type != "Conv" or stride != 1 or shape is None or len(shape) != 4 or None in shape[1:]:
        return None
    if graph.shapes[point.weight][2:] != (3, 3) or attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    settings = _conv_attributes(node, 1)
    if settings.get("pads") != [1, 1, 1, 1] or settings["strides"] != [1, 1] or settings.get("dilations", [1, 1]) != [1, 1]:
        return None
    if attribute(node, "group", 1) != 1 or shape[2] < 3 or shape[3] < 3:
        return None
    return int(shape[1]), int(shape[2]), int(shape[3])


# The 13 shifts (di, dj) a 3×3 patch Gram needs, one of each ± pair: A(−Δ) = A(Δ)ᵀ.
_SHIFTS = [(di, dj) for di in range(3) for dj in range(-2, 3) if di > 0 or dj >= 0]


def _shifted_pieces(h: int, w: int) -> list[tuple[str, tuple[int, int, int, int], tuple[int, int]]]:
    """(name, rows r0:r1 × columns c0:c1 of positions u, shift Δ) of each product Σ x[u]·x[u+Δ]ᵀ that
    _ShiftedGram reads: over all positions with u and u+Δ in the map ("A"), over one border row ("R",
    Δ = (0, dj)) or column ("C", Δ = (di, 0)), and over one corner ("K", Δ = 0)."""
    pieces = [(f"A/{di}/{dj}", (max(0, -di), h - max(0, di), max(0, -dj), w - max(0, dj)), (di, dj)) for di, dj in _SHIFTS]
    pieces += [(f"R/{r}/{d}", (r, r + 1, 0, w - d), (0, d)) for r in (0, h - 1) for d in range(3)]
    pieces += [(f"C/{c}/{d}", (0, h - d, c, c + 1), (d, 0)) for c in (0, w - 1) for d in range(3)]
    pieces += [(f"K/{r}/{c}", (r, r + 1, c, c + 1), (0, 0)) for r in (0, h - 1) for c in (0, w - 1)]
    return pieces


def _shifted_products(g: "GraphBuilder", channels: int, h: int, w: int) -> None:
    """Outputs for _ShiftedGram: the input's per-channel mean m, Σ over samples of x − m (C, H, W), and
    each piece of _shifted_pieces as a product of x − m. A whole-map piece is one product per sample,
    summed over the batch: one float32 product over a whole batch's positions lost digits on narrow
    inputs (16 channels, 16×16 maps: 7× further from float64). A border piece is one product over the
    batch, its few rows being short enough."""
    mean = g.reduce("ReduceMean", g.x, [0, 2, 3], 1)
    g.output(mean, "shifted/m")
    centred = g.op("Sub", g.x, mean)
    g.output(g.reduce("ReduceSum", centred, [0], 0), "shifted/M")
    cut: dict[tuple[int, int, int, int, bool], str] = {}

    def rows(r0: int, r1: int, c0: int, c1: int, per_sample: bool) -> str:  # (N, C, positions) or (C, N·positions)
        if (r0, r1, c0, c1, per_sample) not in cut:
            index = len(g.initializers)
            part = g.op("Slice", centred, g.const(f"s{index}", np.array([r0, c0])), g.const(f"e{index}", np.array([r1, c1])),
                        g.const(f"a{index}", np.array([2, 3])))
            if not per_sample:
                part = g.op("Transpose", part, perm=[1, 0, 2, 3])
            shape = [0, channels, -1] if per_sample else [channels, -1]
            cut[r0, r1, c0, c1, per_sample] = g.op("Reshape", part, g.const(f"r{index}", np.array(shape)))
        return cut[r0, r1, c0, c1, per_sample]

    for name, (r0, r1, c0, c1), (di, dj) in _shifted_pieces(h, w):
        per_sample = name.startswith("A/")
        left, right = rows(r0, r1, c0, c1, per_sample), rows(r0 + di, r1 + di, c0 + dj, c1 + dj, per_sample)
        product = g.op("MatMul", left, g.op("Transpose", right, perm=[0, 2, 1] if per_sample else [1, 0]))
        g.output(g.reduce("ReduceSum", product, [0], 0) if per_sample else product, f"shifted/{name}")


class _ShiftedGram:
    """Σ p·pᵀ of a stride-1 3×3 conv's im2col patches p (zero padding) from products of
    its input x: block (a, b) of offsets a = (i, j), b = (i', j') is Σ x[u]·x[u+Δ]ᵀ, Δ = b − a, over the
    positions u that offset a reads. That is the sum over the whole map (13 shifts, not 45 blocks of 9C×9C
    products), less the one border row (i = i' ≠ 1) or column (j = j' ≠ 1) that offset a never reads, and
    plus their corner, taken off twice. Each batch's float32 products are of x − m (its channel means);
    the m terms are added back here in float64 from the rectangle sums of x − m."""

    def __init__(self, channels: int, h: int, w: int) -> None:
        self.channels, self.h, self.w = channels, h, w
        self.layout = _shifted_pieces(h, w)
        self.pieces: dict[str, np.ndarray] = {}

    def add(self, v: dict[str, np.ndarray], samples: int) -> None:
        m = v["shifted/m"].astype(np.float64).reshape(-1)
        table = np.zeros((self.channels, self.h + 1, self.w + 1))
        table[:, 1:, 1:] = v["shifted/M"].astype(np.float64).cumsum(1).cumsum(2)

        def total(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
            return table[:, r1, c1] - table[:, r0, c1] - table[:, r1, c0] + table[:, r0, c0]

        for name, (r0, r1, c0, c1), (di, dj) in self.layout:
            left, right = total(r0, r1, c0, c1), total(r0 + di, r1 + di, c0 + dj, c1 + dj)
            count = samples * (r1 - r0) * (c1 - c0)
            raw = v[f"shifted/{name}"].astype(np.float64) + np.outer(left, m) + np.outer(m, right + count * m)
            self.pieces[name] = raw if name not in self.pieces else self.pieces[name] + raw

    def gram(self, out: np.ndarray | None = None) -> np.ndarray:
        """(9C, 9C) in the weight's feature order (c, i, j); written into ``out`` when given."""
        c, last_row, last_col = self.channels, self.h - 1, self.w - 1
        gram = np.empty((9 * c, 9 * c)) if out is None else out
        blocks = _weight_order_blocks(gram, 9, c)
        for a in range(9):
            i, j = divmod(a, 3)
            for b in range(9):
                di, dj = b // 3 - i, b % 3 - j
                block = self._pair("A/{}/{}", di, dj) if (di, dj) in _SHIFTS else self._pair("A/{}/{}", -di, -dj).T
                if di == 0 and i != 1:  # offset a never reads the last row (i = 0) or the first (i = 2)
                    block = block - self._pair("R/" + str(last_row if i == 0 else 0) + "/{}", abs(dj), transpose=dj < 0)
                if dj == 0 and j != 1:
                    block = block - self._pair("C/" + str(last_col if j == 0 else 0) + "/{}", abs(di), transpose=di < 0)
                if di == dj == 0 and i != 1 and j != 1:
                    block = block + self.pieces[f"K/{last_row if i == 0 else 0}/{last_col if j == 0 else 0}"]
                blocks[:, a, :, b] = block
        return gram

    def _pair(self, pattern: str, *shift: int, transpose: bool = False) -> np.ndarray:
        piece = self.pieces[pattern.format(*shift)]
        return piece.T if transpose else piece


def _assembled(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``values`` with "Gxx" put together from its upper blocks "Gxx/i/j" (the lower ones mirrored)."""
    blocks = {tuple(map(int, name.split("/")[1:])): value for name, value in values.items() if name.startswith("Gxx/")}
    count = 1 + max(i for i, _ in blocks)
    sizes = [blocks[i, i].shape[-1] for i in range(count)]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    gram = np.empty(blocks[0, 0].shape[:-2] + (bounds[-1], bounds[-1]), np.float32)
    for (i, j), block in blocks.items():
        gram[..., bounds[i]:bounds[i + 1], bounds[j]:bounds[j + 1]] = block
        gram[..., bounds[j]:bounds[j + 1], bounds[i]:bounds[i + 1]] = np.swapaxes(block, -1, -2)
    return {name: value for name, value in values.items() if not name.startswith("Gxx/")} | {"Gxx": gram}


def _point_nodes(point: CorrectionPoint, graph: GraphIndex) -> list[onnx.NodeProto]:
    return [graph.node_by_name[point.name]] + [graph.node_by_name[step.node] for step in point.chain]


def _build(point: CorrectionPoint, graph: GraphIndex, kept: np.ndarray, teacher_channels: int,
           teacher_skip: bool, student_skip: bool, masked: bool, source: str = "output", stride: int = 1,
           prefix: onnx.ModelProto | None = None, shifted: tuple[int, int, int] | None = None) -> onnx.ModelProto:
    """``source``: what x is — the op's "output", its "input" (a widening op, rebuilt on the host), its
    input "patches" (the full solver), or its output "fed" to the probe (probe_reads_output: no copy of
    the op at all). ``stride`` s > 1 (a conv point, sampling.py): the sums read
    output positions (s·i, s·j) only; the teacher's tensors come on those positions already (the
    teacher's runner slices them), the copy of the op runs with s times its strides, and the student's
    skip (and a 1×1 op's input) are sliced here. ``prefix``: a sub-graph of the student that computes
    the point's input from cached tensors (SegmentRunner.side_graph), run first inside the probe so a
    wide input never leaves the runtime; for a 1×1 op sampled with s > 1, the prefix's last conv runs with
    s times its strides instead of the op's copy (sampling.strided_tail). ``shifted`` = (C, H, W)
    (shifted_geometry): the patch Gram comes as shifted channel products of the input instead (_ShiftedGram)."""
    g = GraphBuilder(graph.opset or 13, _X if prefix is None else point.input)
    copy_stride = stride  # the strides factor of the op's copy: 1 where the prefix already gives sampled positions
    if prefix is not None:
        tail = None
        if _reads_sampled_input(point, graph, stride, source):
            tail = strided_tail(list(prefix.graph.node), point.input, stride, {t.name: t for t in prefix.graph.initializer})
        g.nodes.extend(tail if tail is not None else prefix.graph.node)
        g.initializers.extend(prefix.graph.initializer)
        copy_stride = 1 if tail is not None else stride
    # The statistics-only copy of op + chain, reading the probe's input (none when the output is fed).
    nodes = _point_nodes(point, graph) if source != "fed" else []
    copy_outputs = [f"fskd/y{index}" for index in range(len(nodes))]
    copies = strided_copies(nodes, copy_outputs, copy_stride, "fskd/copy", {point.input: g.x})
    g.nodes.extend(copies)
    constants = {name for copy in copies for name in copy.input if name and name != g.x and name not in copy_outputs}
    sampled = (lambda name: g.sampled(name, stride)) if stride > 1 else (lambda name: name)
    y = sampled(g.x) if source == "fed" else copy_outputs[-1]
    present = {t.name for t in g.initializers}  # a prefix may hold some of the point's constants already
    g.initializers.extend(graph.model.graph.initializer[i] for i in _initializer_positions(graph, constants - present))
    axis = point.channel_axis
    target = g.op("Add", _T, _T_SKIP) if teacher_skip else _T
    if len(kept) != teacher_channels or not np.array_equal(kept, np.arange(teacher_channels)):
        target = g.op("Gather", target, g.const("kept", np.asarray(kept, np.int64)), axis=axis)
    if student_skip:
        target = g.op("Sub", target, sampled(_S_SKIP))
    d = g.op("Sub", target, y)
    blocks, k = point.groups, point.group_size
    positions = _positions(graph.shapes.get(point.output), axis, stride)
    dp = g.planes(d, axis, blocks, k, point.channels)
    in_channels = graph.shapes[point.weight][1] if point.op_type == "Conv" else graph.shapes[point.weight][0]
    if source == "patches" and point.op_type == "Conv":
        in_channels = int(np.prod(graph.shapes[point.weight][1:]))  # the patch features
        xp = g.planes(_patches(g, point, graph, stride), 1, 1, in_channels, in_channels)
    elif source in ("input", "patches"):  # the input's sums: y = A·x + b is rebuilt on the host
        if source == "patches":  # a Gemm or MatMul: its input rows, as wide as its output-major weight's rows
            in_channels = patch_features(point, graph)
        x = sampled(g.x) if copy_stride > 1 else g.x
        xp = g.planes(x, 1 if point.op_type == "Conv" else -1, 1, in_channels, in_channels)  # the op's own input layout
    else:
        xp = g.planes(y, axis, blocks, k, point.channels)
    weight = None
    if masked:  # (N, L) → (N, 1, 1, L) row weights; a per-sample (N, 1) weight spread over the L rows
        weight = g.op("Cast", g.op("Reshape", _MASK, g.const("mask_shape", np.array([0, 1, 1, -1]))),
                      to=TensorProto.FLOAT)
        zero, three, four = (g.const(f"index{i}", np.array([i])) for i in (0, 3, 4))
        rows_shape = g.op("Concat", g.op("Slice", g.op("Shape", weight), zero, three),
                          g.op("Slice", g.op("Shape", dp), three, four), axis=0)  # (N, 1, 1, L)
        weight = g.op("Expand", weight, rows_shape)
    g.output(g.op("Shape", dp), "shape")
    g.output(g.reduce("ReduceSum", weight, [0, 1, 2, 3], 0) if masked else g.const("no_mask", np.float32(-1)), "rows")
    xc = g.centred(xp, "sx", "Sx", weight)
    dc = g.centred(dp, "sd", "Sd", weight)
    # Per-sample sums of products along the contiguous position axis, as Mul + ReduceSum: ORT runs them
    # faster than its ReduceSumSquare, and far faster than a ReduceSum over samples and positions (4.8M
    # elements: 1.6 ms, 2.1 ms, 2.9 ms). MobileNet-like bench net, ir7.dw probe, 64 rows: 19–24 ms → 14 ms.
    g.output(g.reduce("ReduceSum", g.op("Mul", dc, dc), [3], 0), "Qd")
    if k == 1 and source in ("output", "fed"):  # depthwise: one scalar regression per channel, summed per
        # sample (the host adds the samples up in float64)
        g.output(g.reduce("ReduceSum", g.op("Mul", xc, xc), [3], 0), "Gxx")
        g.output(g.reduce("ReduceSum", g.op("Mul", xc, dc), [3], 0), "Gxd")
    elif positions is not None and positions >= PER_SAMPLE_POSITIONS and source != "patches":
        # Many positions per sample: one (k×L)·(L×k) product per sample, summed (no relayout).
        for other, name in ((xc, "Gxx"), (dc, "Gxd")):
            g.output(g.reduce("ReduceSum", g.op("MatMul", xc, g.op("Transpose", other, perm=[0, 1, 3, 2])), [0], 0), name)
    else:  # few positions: samples and positions as one long row axis, one product per block
        rows_x = g.rows(xc)
        rows_d = g.rows(dc)
        bounds = _gram_blocks(in_channels) if source == "patches" and shifted is None else None
        if shifted is not None:
            _shifted_products(g, *shifted)
        elif bounds is None:
            g.output(g.op("MatMul", rows_x, g.op("Transpose", rows_x, perm=[0, 2, 1])), "Gxx")
        else:  # the upper blocks only: the Gram is symmetric (numpy's a·aᵀ does the same with syrk)
            pieces = [g.op("Slice", rows_x, g.const(f"start{i}", np.array([lo])), g.const(f"end{i}", np.array([hi])),
                           g.const(f"axis{i}", np.array([1]))) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
            for i, left in enumerate(pieces):
                for j in range(i, len(pieces)):
                    g.output(g.op("MatMul", left, g.op("Transpose", pieces[j], perm=[0, 2, 1])), f"Gxx/{i}/{j}")
        g.output(g.op("MatMul", rows_x, g.op("Transpose", rows_d, perm=[0, 2, 1])), "Gxd")
    outputs = [o.output[0] for o in g.nodes if o.op_type == "Identity" and o.name.startswith("fskd/out_")]
    inputs = ([] if prefix is not None else [_X]) + [_T] + ([_T_SKIP] if teacher_skip else [])
    inputs += ([_S_SKIP] if student_skip else []) + ([_MASK] if masked else [])
    types = {_MASK: TensorProto.INT64}
    graph_proto = helper.make_graph(
        g.nodes, f"fskd_probe_{point.name}",
        (list(prefix.graph.input) if prefix is not None else [])
        + [helper.make_tensor_value_info(name, types.get(name, TensorProto.FLOAT), None) for name in inputs],
        [helper.make_tensor_value_info(name, TensorProto.INT64 if name == "shape" else TensorProto.FLOAT, None)
         for name in outputs],
        g.initializers)
    return helper.make_model(graph_proto, ir_version=graph.model.ir_version, opset_imports=[helper.make_opsetid("", g.opset)])


def _reads_sampled_input(point: CorrectionPoint, graph: GraphIndex, stride: int, source: str) -> bool:
    """Whether the probe reads the point's input on the sampled positions (s·i, s·j) only: a 1×1 conv
    with strides 1 and no padding, its output or its input summed (then a prefix can compute its input
    on those positions alone, sampling.strided_tail)."""
    if stride == 1 or source not in ("output", "input") or point.op_type != "Conv" or point.rank != 4:
        return False
    node = graph.node_by_name[point.name]
    return (graph.shapes[point.weight][2:] == (1, 1) and all(v == 1 for v in attribute(node, "strides", [1, 1]))
            and not any(attribute(node, "pads", [0, 0, 0, 0]))
            and explicit_pads(node))


def _positions(shape: tuple | None, axis: int, stride: int = 1) -> int | None:
    """Rows per sample of a point's statistics (every ``stride``-th row and column of a conv's output
    map), when shape inference knows them."""
    if shape is None or any(d is None for d in shape[1:]):
        return None
    return int(np.prod([-(-d // stride) if i >= 2 else d for i, d in enumerate(shape) if i not in (0, axis % len(shape))]))


def _patches(g: GraphBuilder, point: CorrectionPoint, graph: GraphIndex, stride: int) -> str:
    """(N, F, H', W') im2col patches of the point's conv at the sampled positions, in the weight's feature
    order (c, i, j): one conv with the conv's pads, dilations and strides (times ``stride``), C_in groups
    of kh·kw one-hot kernels, kh·kw multiply-adds per patch element. 64 rows, 2-core CPU: 11–28 ms where
    a strided Slice per kernel offset and a Concat took 24–128 ms (C_in 64 at 56×56, stride 2: 25.7
    against 127.5 ms; 512 at 7×7: 15.4 against 23.8 ms)."""
    node = graph.node_by_name[point.name]
    _, channels, kh, kw = graph.shapes[point.weight]
    return g.op("Conv", g.x, g.const("one_hot", _one_hot_kernels(channels, kh, kw)), group=channels,
                **_conv_attributes(node, stride))


def _one_hot_kernels(channels: int, kh: int, kw: int) -> np.ndarray:
    """(C·kh·kw, 1, kh, kw): output channel (c, i, j) of group c copies its input at kernel offset (i, j)."""
    return np.tile(np.eye(kh * kw, dtype=np.float32).reshape(kh * kw, 1, kh, kw), (channels, 1, 1, 1))


def _conv_attributes(conv: onnx.NodeProto, stride: int) -> dict:
    """The conv's pads, dilations and strides (times ``stride``), for a conv with other kernels."""
    attributes = {a.name: list(a.ints) for a in conv.attribute if a.name in ("pads", "dilations", "strides")}
    attributes["strides"] = [v * stride for v in attributes.get("strides", [1, 1])]
    return attributes


def _initializer_positions(graph: GraphIndex, names: set[str]) -> list[int]:
    return [i for i, t in enumerate(graph.model.graph.initializer) if t.name in names]


class GraphBuilder:
    """Node-by-node construction with fresh names; reductions in the form the opset wants."""

    def __init__(self, opset: int, x: str):
        self.opset = opset
        self.x = x  # the tensor that holds the point's input
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def op(self, op_type: str, *inputs: str, **attrs) -> str:
        out = f"fskd/t{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=f"fskd/n{len(self.nodes)}", **attrs))
        return out

    def const(self, name: str, value: np.ndarray) -> str:
        full = f"fskd/c_{name}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value), full))
        return full

    def output(self, tensor: str, role: str) -> None:
        self.nodes.append(helper.make_node("Identity", [tensor], [role], name=f"fskd/out_{role}"))

    def reduce(self, op_type: str, tensor: str, axes: list[int], keepdims: int) -> str:
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(op_type, tensor, self.const(f"axes{len(self.initializers)}", np.array(axes, np.int64)),
                           keepdims=keepdims)
        return self.op(op_type, tensor, axes=axes, keepdims=keepdims)

    def planes(self, tensor: str, axis: int, blocks: int, k: int, channels: int) -> str:
        """(N, B, k, L): channels-first tensors by a reshape, channels-last ones through a transpose."""
        if axis != 1:
            rows = self.op("Reshape", tensor, self.const(f"rows{len(self.initializers)}", np.array([0, -1, channels])))
            tensor = self.op("Transpose", rows, perm=[0, 2, 1])
        return self.op("Reshape", tensor, self.const(f"planes{len(self.initializers)}", np.array([0, blocks, k, -1])))

    def sampled(self, tensor: str, stride: int) -> str:
        """Every ``stride``-th row and column of an (N, C, H, W) tensor."""
        node = grid_node(tensor, f"fskd/t{len(self.nodes)}", stride)
        self.nodes.append(node)
        return node.output[0]

    def rows(self, planes: str) -> str:
        """(N, B, k, L) → (B, k, N·L)."""
        moved = self.op("Transpose", planes, perm=[1, 2, 0, 3])
        return self.op("Reshape", moved, self.const(f"rows{len(self.initializers)}", np.array([0, 0, -1])))

    def centred(self, planes: str, role: str, sums_role: str, weight: str | None) -> str:
        """(planes − s)·w with s the per-channel mean of the rows that count (any shift is exact, the host
        adds it back; the closer to the mean, the less float32 cancellation), output as ``role``, and the
        per-sample sums of (planes − s)·w as ``sums_role`` (N, B, k).
        One pass over the planes, per sample along their contiguous position axis, gives both s and the sums
        (Σx − count·s), instead of a strided mean over (N, L) and a second pass for the sums. Without a
        weight the same ops run on w = 1, so padding a batch (weight 0) leaves every number of the real
        rows as it was."""
        weighted = planes if weight is None else self.op("Mul", planes, weight)
        sums = self.reduce("ReduceSum", weighted, [3], 1)  # (N, B, k, 1)
        if weight is None:
            shape = self.op("Cast", self.op("Shape", planes), to=TensorProto.FLOAT)
            count = self.op("Gather", shape, self.const(f"positions{len(self.initializers)}", np.array(3)), axis=0)
            total = self.op("Mul", self.op("Gather", shape, self.const(f"samples{len(self.initializers)}", np.array(0)), axis=0), count)
        else:
            count = self.reduce("ReduceSum", weight, [3], 1)  # (N, 1, 1, 1)
            total = self.reduce("ReduceSum", count, [0], 1)
        shift = self.op("Div", self.reduce("ReduceSum", sums, [0], 1),
                        self.op("Max", total, self.const(f"one{len(self.initializers)}", np.float32(1))))
        self.output(shift, role)
        centred_sums = self.op("Sub", sums, self.op("Mul", count, shift))
        self.output(self.op("Reshape", centred_sums, self.const(f"sums{len(self.initializers)}", np.array([0, 0, -1]))), sums_role)
        centred = self.op("Sub", planes, shift)
        return centred if weight is None else self.op("Mul", centred, weight)
