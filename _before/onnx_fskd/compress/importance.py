"""Channel importance per group, and which channels each group keeps.

Criteria: L1 / L2 norm of each output filter (Li et al. 2017), summed over the layers that produce the
group; |γ| of the BatchNorms that scale the group's channels (network slimming, read from the BN nodes
themselves, before anything is folded); or random (seeded), as a baseline."""

from __future__ import annotations

import math

import numpy as np

from ..errors import UsageError
from ..graph import GraphIndex
from ..ops import linear_op_for
from .groups import Group

CRITERIA = ("l1", "l2", "bn", "random")


def importance(graph: GraphIndex, group: Group, criterion: str, rng: np.random.Generator) -> tuple[np.ndarray, str | None]:
    """One score per group channel (higher = more important), and a note when the criterion fell back."""
    if criterion not in CRITERIA:
        raise UsageError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if criterion == "random":
        return rng.random(group.channels), None
    if criterion == "bn":
        if group.bn_gammas:
            return np.sum(group.bn_gammas, axis=0), None
        note = f"{group.root}: no BatchNormalization on its channels, ranked by L1 norm instead of |γ|"
        return filter_norms(graph, group, 1), note
    return filter_norms(graph, group, 1 if criterion == "l1" else 2), None


def filter_norms(graph: GraphIndex, group: Group, order: int) -> np.ndarray:
    """Per group channel, the L1 or L2 norm of all the filters that produce it (a head: its block of rows)."""
    total = np.zeros(group.channels)
    for name in group.producers:
        node = graph.node_by_name[name]
        weight = linear_op_for(node).to_output_major(node, graph.constant(node.input[1])).astype(np.float64)
        powers = np.sum(np.abs(weight.reshape(len(weight), -1)) ** order, axis=1)
        total += np.sum(powers[group.producer_positions[name]], axis=1)
    return total ** (1.0 / order)


def keep_count(channels: int, keep: int, round_to: int) -> int:
    """``keep`` rounded to a multiple of ``round_to`` (at least one multiple), never 0, never above ``channels``."""
    if round_to > 1 and channels >= round_to:
        keep = max(round_to, int(math.floor(keep / round_to + 0.5)) * round_to)
    return int(min(channels, max(1, keep)))


def per_layer_counts(groups: list[Group], ratio: float, round_to: int) -> list[int]:
    return [keep_count(g.channels, g.channels - int(math.floor(g.channels * ratio + 1e-9)), round_to) for g in groups]


def global_counts(groups: list[Group], scores: list[np.ndarray], ratio: float, round_to: int) -> list[int]:
    """One threshold over importances normalised by each group's mean: the least important channels of
    the whole model go first, each group keeping at least one channel (one multiple of ``round_to``)."""
    entries = []
    for index, score in enumerate(scores):
        mean = float(np.mean(score))
        normalised = score / mean if mean > 0 else np.ones_like(score)
        entries.extend((value, index) for value in normalised)
    entries.sort(key=lambda item: item[0])
    budget = int(math.floor(sum(g.channels for g in groups) * ratio + 1e-9))
    keep = [g.channels for g in groups]
    floor = [min(g.channels, max(1, round_to)) for g in groups]
    for _, index in entries:
        if budget == 0:
            break
        if keep[index] > floor[index]:
            keep[index] -= 1
            budget -= 1
    return [keep_count(g.channels, k, round_to) for g, k in zip(groups, keep)]


def kept_channels(score: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` highest-scoring channels, in ascending index order (ties: lower index first)."""
    order = np.argsort(-score, kind="stable")
    return np.sort(order[:count])
