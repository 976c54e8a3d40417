"""The fit report: per point and totals, as dataclasses and as the JSON documented in README."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .metrics import Comparison

HELD_OUT = "held-out"
IN_SAMPLE = "in-sample"


@dataclass
class PointReport:
    """What happened at one correction point."""

    student: str
    teacher: str
    op_type: str
    channels: int
    teacher_channels: int
    groups: int
    rows: int
    target: str            # "plain" (the op's own output) or "sum" (the residual Add's output)
    channel_map: str       # how kept channels were found: identity | map | metadata | weights | activations
    solver: str            # "q" (FSKD's Q after the op) or "full" (the op's whole weight refitted)
    error_before: float    # the guard's relative error of the point's output against its target, on the
    error_after: float     # held-out samples, of the candidate fitted without them (see FitReport.measured_on)
    status: str            # "kept" or "rejected" (the guard found no held-out gain)
    statistics: str = "host"  # where the sums were computed: "runtime" (in-graph, ORT) or "host" (NumPy)
    position_stride: int = 1  # the sums read every n-th row and column of a conv's output (sampling.py)


@dataclass
class OutputMetrics:
    """A model's final output against the teacher's: top-1 agreement for class scores, cosine similarity
    for embeddings (metrics.choose_metric)."""

    relative_error: float
    agreement: float | None
    cosine: float | None = None
    metric: str = "top1"

    @classmethod
    def of(cls, comparison: Comparison, metric: str) -> "OutputMetrics":
        return cls(comparison.relative_error, comparison.agreement, comparison.cosine, metric)


@dataclass
class FitReport:
    provider: str
    mode: str
    points_option: str
    residual_target: str
    solver: str
    samples_fit: int
    samples_heldout: int
    points: list[PointReport] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    # What ``before``/``after`` and the points' errors were measured on: HELD_OUT (samples no correction was
    # fitted on; ``after`` is the model of the guard's candidates, fitted on the fit samples only) or
    # IN_SAMPLE (nothing held out: the written model on the samples it was fitted on).
    measured_on: str = ""
    before: OutputMetrics | None = None
    after: OutputMetrics | None = None
    written_in_sample: OutputMetrics | None = None  # the written model on the same samples: it was refitted on them
    exactness: float = 0.0    # max relative error: merged model vs. model with explicit Q nodes
    exactness_tolerance: float = 0.0  # the bound exactness was checked against
    verified_on: str = ""     # provider of that check: "cpu" or "cuda (use_tf32=0)"
    consistency: float | None = None  # sequential: merged model vs. the corrected activations the fit used
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    # versions, every option, the seed and each input's SHA-256 (provenance.run_record), to reproduce a run
    run: dict = field(default_factory=dict)
    augmentation: str = "none"        # extra fit rows made from the samples: none | flip | flip+shift
    samples_augmented: int = 0
    reselection: list[dict] = field(default_factory=list)  # per pruned group: channels changed, errors
    polish: dict | None = None        # the gradient polish, when asked for
    # the activation cache: its RAM budget, and the peaks it held in RAM and in a mapped temporary file (bytes)
    memory: dict = field(default_factory=dict)

    @property
    def rejected(self) -> list[str]:
        return [p.student for p in self.points if p.status == "rejected"]

    def to_json(self) -> dict:
        return asdict(self)
