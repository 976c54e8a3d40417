"""Probe and run: execute a graph piece by piece with ONNX Runtime, caching the boundary tensors.

Asking for a tensor runs only the not-yet-run nodes it depends on (a sub-graph cut with
onnx.utils.Extractor), so fitting every point in turn costs one pass of the graph in total, and a
fitted Q can be applied to a cached tensor before anything downstream of it runs.

A tensor can also be asked for on a grid of positions only (``sampled_name``): the segment slices it
before it leaves the runtime, so a statistic that reads every s-th row and column (sampling.py) moves
1/s² of it to the host, and the full tensor is never cached."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx.utils import Extractor

from .errors import FskdError
from .buffers import BufferPool
from .fuse import ModelWriter, WeightUpdate, write_update
from .graph import GraphIndex
from .memory import ActivationMemory
from .ops.base import explicit_pads
from .points import CorrectionPoint, linear_op_for_type
from .runtime import make_session, rows_within_arena, run_batched
from .sampling import grid_node, sample_positions, strided_copies
from .solve import Adapter
from .shapes import weightless_copy


_SAMPLED = "fskd/every{stride}/"
# A tensor at least this many times larger than the cached tensors it is computed from (a 6× expansion)
# is recomputed inside each probe that reads it rather than cached for every sample; at most this many nodes.
WIDENING = 2.0
MAX_SIDE_NODES = 16
# A sampled conv output is computed by a copy of the conv with s times its strides (the real conv keeps its
# fused activation and ORT's blocked layout) when that copy costs at most this many multiply-adds per
# output element of the real conv; else the real output is sliced (a layout reorder of the whole tensor).
# MobileNet-like teacher with every point's output sampled: 0.71 s with copies, 1.4-1.8 s with slices, 0.47 s
# for the plain forward (2-core CPU, 128 samples); ResNet-18 about the same either way.
MAX_COPY_MACS = 64
_PER_CHANNEL_OPS = ("BatchNormalization", "Add", "Sub", "Mul", "Div")


def sampled_name(tensor: str, stride: int) -> str:
    """The name under which a runner returns every ``stride``-th row and column of an (N, C, H, W)
    tensor; the tensor's own name for stride 1."""
    return tensor if stride == 1 else _SAMPLED.format(stride=stride) + tensor


def _parse_sampled(name: str) -> tuple[str, int]:
    """(tensor, stride) of a name from sampled_name."""
    if name.startswith("fskd/every"):
        stride, _, tensor = name[len("fskd/every"):].partition("/")
        return tensor, int(stride)
    return name, 1


class SegmentRunner:
    """One model, its sample cache, and the set of nodes already run."""

    def __init__(self, model: onnx.ModelProto, graph: GraphIndex, providers: list[str],
                 batch_size: int, fixed_batch: int | None, on_batch: Callable[[int, int], None] | None = None,
                 memory: ActivationMemory | None = None):
        self.graph = graph
        self.providers = providers
        self.batch_size = batch_size
        self.fixed_batch = fixed_batch
        self.on_batch = on_batch
        self.ir_version = model.ir_version
        self.extractor = Extractor(model)
        # Cut points need typed value infos; infer them on a weightless copy instead of the whole model.
        inferred = onnx.shape_inference.infer_shapes(weightless_copy(model)).graph
        self.extractor.value_infos.update({v.name: v for v in inferred.value_info})
        self.cache: dict[str, np.ndarray] = {}
        self.buffers = BufferPool(memory=memory)
        self.pinned: set[str] = set()
        self.done: set[str] = set()
        self.folded: dict[str, tuple[CorrectionPoint, WeightUpdate]] = {}  # op name → its fitted weights
        self.deferred: dict[str, Adapter] = {}  # cached tensor → the correction its readers apply first

    def start(self, feeds: dict[str, np.ndarray]) -> None:
        self.cache = dict(feeds)
        self.done = set()

    def compute(self, wanted: list[str], prefetch: list[str] = (), later: list[str] = ()) -> dict[str, np.ndarray]:
        """The wanted tensors over all samples, running only what has not run yet. ``prefetch`` tensors
        come out of the same run and stay cached until released: fewer, longer segments; they never start a
        run by themselves (the cache then holds at most the prefetch ahead of what is wanted). ``later``: tensors
        asked for afterwards; those whose producer this run executes anyway come out of it too, pinned like
        ``prefetch`` (else a later request recomputes them from the nearest cached tensor, the samples at
        worst: ResNet-18's teacher with flips ran its first two stages three times, 10 s of an 89 s fit)."""
        missing = [name for name in dict.fromkeys(list(wanted) + list(prefetch)) if name not in self.cache]
        for name in missing:  # sampled views of tensors already cached: sliced here
            tensor, stride = _parse_sampled(name)
            if stride > 1 and tensor in self.cache:
                self._apply_deferred(tensor)
                grid = sample_positions(self.cache[tensor], stride)
                self.cache[name] = self.buffers.empty(grid.shape, grid.dtype)
                self.cache[name][...] = grid
        missing = [name for name in missing if name not in self.cache]
        if any(name in missing for name in wanted):
            anyway = self._computed_anyway(missing, later)
            self._run_segment(missing + anyway)
            self.pinned |= set(anyway)
        self.pinned |= set(prefetch) & set(self.cache)
        for name in wanted:
            self._apply_deferred(name)
        result = {name: self.cache[name] for name in wanted}
        self._evict()
        return result

    def release(self, names: list[str]) -> None:
        """Unpin prefetched tensors that will not be asked for after all."""
        self.pinned -= set(names)
        self._evict()

    def replace(self, name: str, value: np.ndarray) -> None:
        """Overwrite a cached tensor (a point's output after its Q) before its consumers run."""
        self.buffers.retire(self.cache[name])
        self.cache[name] = value

    def defer(self, tensor: str, adapter: Adapter) -> None:
        """Correct a cached channels-first (N, C, H, W) tensor, Q·y + d (a point's output that ran
        uncorrected), where it is read: each segment reading it applies it first, as a 1×1 conv, so the
        corrected tensor is never written on the host (ResNet-18: 11 such points, 0.6 s of host matmuls);
        a caller asking for the tensor itself (compute, a probe's prefix) gets it corrected in the cache."""
        if tensor in self.deferred:
            raise FskdError(f"internal: {tensor} already has a correction pending")
        self.deferred[tensor] = adapter

    def _apply_deferred(self, name: str) -> None:
        adapter = self.deferred.pop(name, None)
        if adapter is not None:
            value = self.cache[name]
            self.replace(name, adapter.apply(value, 1, self.buffers.empty(value.shape, value.dtype)))

    def fold(self, point: CorrectionPoint, update: WeightUpdate) -> None:
        """Run the point's op (and chain) with the fitted weights from now on: ORT applies the point's Q
        when the segment holding it runs, so its corrected output never passes through the host."""
        if point.name in self.done:
            raise FskdError(f"internal: {point.name} already ran; its fitted weights cannot be folded in")
        self.folded[point.name] = (point, update)

    def side_graph(self, target: str) -> onnx.ModelProto | None:
        """A model (folded weights included) that computes ``target`` from cached tensors, for a probe to run
        first, when ``target`` is not cached and is WIDENING times wider than what it is computed from (the
        output of an expansion, or what follows it before it narrows again); nothing is run or cached here.
        None otherwise (compute() it)."""
        if target in self.cache:
            return None
        nodes = self._nodes_for([target])
        produced = {out for node in nodes for out in node.output if out}
        inputs = sorted({i for node in nodes for i in node.input
                         if i and i not in produced and not self.graph.is_constant(i)})
        if not nodes or len(nodes) > MAX_SIDE_NODES or any(name not in self.cache for name in inputs):
            return None
        wide, narrow = self.graph.per_sample(target), sum(int(np.prod(self.cache[name].shape[1:])) for name in inputs)
        if wide is None or wide < WIDENING * narrow:
            return None
        try:
            side = self.extractor.extract_model(inputs, [target])
        except ValueError:
            return None
        side.ir_version = self.ir_version
        self._write_folded(side, {node.name for node in nodes})
        for name in inputs:  # the probe reads the cache: corrected there
            self._apply_deferred(name)
        return side

    def _run_segment(self, missing: list[str]) -> None:
        sampled = {name: _parse_sampled(name) for name in missing if _parse_sampled(name)[1] > 1}
        plain = [name for name in missing if name not in sampled]
        nodes = self._nodes_for(plain + [tensor for tensor, _ in sampled.values()])
        produced = {out for node in nodes for out in node.output if out}
        inputs = sorted({i for node in nodes for i in node.input
                         if i and i not in produced and not self.graph.is_constant(i)})
        absent = [name for name in inputs if name not in self.cache]
        if absent:
            raise FskdError(f"internal: segment input {absent[0]} is neither cached nor computable")
        self.done.update(node.name for node in nodes)
        keep = [out for out in produced if self._still_needed(out)]
        outputs = list(dict.fromkeys(plain + sorted(keep)))
        bases = [tensor for tensor, _ in sampled.values() if tensor not in outputs]
        try:
            segment = self.extractor.extract_model(inputs, outputs + bases)
        except ValueError as exc:
            raise FskdError(f"cannot cut a sub-graph at {(outputs + bases)[0]}: {exc}") from None
        segment.ir_version = self.ir_version
        self._write_folded(segment, {node.name for node in nodes})
        _apply_first(segment, {name: self.deferred[name] for name in inputs if name in self.deferred})
        _add_sampled_outputs(segment, sampled, bases, self.graph)
        outputs += list(sampled)
        session = make_session(segment, self.providers, exact=True)
        feeds = {name: self.cache[name] for name in inputs}
        self.cache.update(run_batched(session, feeds, outputs, self._rows_per_run(nodes, session), self.fixed_batch,
                                      self.on_batch, allocate=self.buffers.empty))

    def _rows_per_run(self, nodes: list[onnx.NodeProto], session: ort.InferenceSession) -> int:
        """Rows per run of a segment: one batch's node outputs (float32, as far as shape inference knows
        them) within the arena bound (runtime.rows_within_arena)."""
        per_sample = self.graph.known_per_sample([name for node in nodes for name in node.output if name])
        return rows_within_arena(session, 4 * per_sample, self.batch_size)

    def _write_folded(self, segment: onnx.ModelProto, names: set[str]) -> None:
        """The segment's copy of each folded point gets its fitted weights (the runner's model stays as given)."""
        points = [self.folded[name] for name in names if name in self.folded]
        if points:
            writer = ModelWriter(segment)
            for point, update in points:
                write_update(writer, point, update)

    def _nodes_for(self, targets: list[str]) -> list[onnx.NodeProto]:
        """Not-yet-run nodes that the targets depend on, stopping at cached tensors, in graph order."""
        chosen: set[str] = set()
        stack = list(targets)
        while stack:
            name = stack.pop()
            if name in self.cache:
                continue
            node = self.graph.producer.get(name)
            if node is None or node.name in chosen:
                continue
            chosen.add(node.name)
            stack.extend(i for i in node.input if i)
        return [n for n in self.graph.nodes if n.name in chosen]

    def _computed_anyway(self, missing: list[str], later: list[str]) -> list[str]:
        """The ``later`` tensors (sampled or not) whose producers are among the nodes that computing
        ``missing`` runs."""
        running = {node.name for node in self._nodes_for([_parse_sampled(name)[0] for name in missing])}
        return [name for name in dict.fromkeys(later) if name not in self.cache and name not in missing
                and getattr(self.graph.producer.get(_parse_sampled(name)[0]), "name", None) in running]

    def _still_needed(self, tensor: str) -> bool:
        # Graph inputs stay: the caller holds the samples anyway, and any tensor can be recomputed from them.
        if tensor in self.graph.graph_outputs or tensor in self.graph.graph_inputs or tensor in self.pinned:
            return True
        return any(c.name not in self.done for c in self.graph.consumers.get(tensor, []))

    def _evict(self) -> None:
        for name in [n for n in self.cache if not self._still_needed(n)]:
            self.deferred.pop(name, None)
            self.buffers.retire(self.cache.pop(name))


def _apply_first(model: onnx.ModelProto, corrections: dict[str, Adapter]) -> None:
    """Each corrected (N, C, H, W) float32 graph input read through the 1×1 conv computing Q·y + d that the
    merge check inserts too (ConvOp.explicit_q), which ORT fuses with what follows (a ReLU, a residual Add).
    Here it is grouped as Q's diagonal blocks are: a grouped conv's Q costs g multiply-adds per element,
    not C (C = 256 in blocks of 4 at 14×14: 3.2 ms per 64 rows against 18.3 ms dense, 2-core CPU)."""
    graph = model.graph
    for name, adapter in corrections.items():
        corrected = f"{name}/fskd_corrected"
        for node in graph.node:
            node.input[:] = [corrected if i == name else i for i in node.input]
        count, size, _ = adapter.blocks.shape
        nodes, initializers = linear_op_for_type("Conv").explicit_q(
            corrected, name, corrected, adapter.blocks.reshape(count * size, size), adapter.d, 4, group=count)
        graph.initializer.extend(initializers)
        graph.node.insert(0, nodes[0])


def _add_sampled_outputs(segment: onnx.ModelProto, sampled: dict[str, tuple[str, int]], bases: list[str],
                         graph_index: GraphIndex) -> None:
    """Nodes for the sampled outputs (a strided copy of the producing conv, or sampling.grid_node); tensors cut only to
    be sampled stop being outputs."""
    graph = segment.graph
    types = {output.name: output.type.tensor_type.elem_type for output in graph.output}
    for name, (tensor, stride) in sampled.items():
        graph.output.append(onnx.helper.make_tensor_value_info(name, types[tensor], None))
        recipe = _strided_recipe(graph_index, tensor, stride)
        if recipe is not None:
            outputs = [f"{name}/t{index}" for index in range(len(recipe) - 1)] + [name]
            graph.node.extend(strided_copies(recipe, outputs, stride, f"{name}/copy"))
            continue
        graph.node.append(grid_node(tensor, name, stride))
    kept = [output for output in graph.output if output.name not in bases]
    del graph.output[:]
    graph.output.extend(kept)


def _strided_recipe(graph: GraphIndex, tensor: str, stride: int) -> list[onnx.NodeProto] | None:
    """The conv and per-channel constant ops (BN, Add/Sub/Mul/Div by a per-channel constant) that produce
    ``tensor``, conv first, when a copy of them with s times the conv's strides is cheap (MAX_COPY_MACS);
    else None."""
    chain: list[onnx.NodeProto] = []
    node = graph.producer.get(tensor)
    while node is not None and node.op_type in _PER_CHANNEL_OPS and len(chain) < 4:
        computed = [name for name in node.input if name and not graph.is_constant(name)]
        if len(computed) != 1 or any(graph.is_constant(name) and graph.constant(name).size > _channels(graph, tensor)
                                     for name in node.input if name):
            return None
        chain.insert(0, node)
        node = graph.producer.get(computed[0])
    if node is None or node.op_type != "Conv" or len(node.input) < 2 or not graph.is_constant(node.input[1]):
        return None
    if not explicit_pads(node):
        return None
    if int(np.prod(graph.constant(node.input[1]).shape[1:])) > MAX_COPY_MACS * stride * stride:
        return None
    return [node] + chain


def _channels(graph: GraphIndex, tensor: str) -> int:
    shape = graph.shapes.get(tensor)
    return int(shape[1]) if shape and len(shape) > 1 and shape[1] else 1

