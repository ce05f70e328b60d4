"""The pass manager: an ordered list of passes, each stating what it requires and guarantees.

Requirements are checked before anything runs, every pass is timed, and the graph is linted after each pass,
so a broken rewrite is caught at the pass that broke it.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import fx, nn

from qcompile.errors import PipelineError, first_line
from qcompile.frontend.graph import compute_nodes, format_graph
from qcompile.frontend.tracing import LeafSpec, capture
from qcompile.quantization.cost import CostTotals
from qcompile.quantization.recipes import RECIPES, Override, Recipe
from qcompile.quantization.spec import META_KEY, NodeQuant

# Properties a graph can have; passes require and guarantee these.
CAPTURED = "captured"
SHAPES = "shapes"
WIDTH_SCALED = "width_scaled"
BN_FOLDED = "bn_folded"
PRECISION = "precision_assigned"
COST = "cost_annotated"
QUANTIZERS = "quantizers_inserted"
CALIBRATED = "calibrated"
LOWERED = "lowered"


@dataclass(frozen=True)
class WidthReference:
    """The width-1.0 model's MACs and weight count, kept so costs can be compared with it after scaling."""

    macs: int
    params: int


@dataclass
class PassContext:
    """What passes share besides the graph: inputs, the recipe, and results later passes or reports read."""

    example_inputs: tuple[torch.Tensor, ...]
    recipe: Recipe = field(default_factory=lambda: RECIPES["bf16"])
    overrides: list[Override] = field(default_factory=list)
    width: float = 1.0
    properties: set[str] = field(default_factory=lambda: {CAPTURED, SHAPES})
    timings: list[tuple[str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    width_reference: WidthReference | None = None
    cost: CostTotals | None = None
    calibration_data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
    calibration_images: int = 0
    ir: Any = None  # the integer IR (qcompile.ir.IRGraph) once lower_integer has run
    float_reference: fx.GraphModule | None = None  # the float graph PTQ passes match (set by bn_tune / adaquant)
    results: dict[str, Any] = field(default_factory=dict)  # per-pass findings for the report (PTQ, plans)

    @classmethod
    def for_graph(cls, gm: fx.GraphModule, **kwargs: object) -> PassContext:
        """A context whose example inputs are random tensors shaped like the graph's recorded placeholders."""
        inputs = []
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                tm = n.meta.get("tensor_meta")
                if tm is None:
                    raise PipelineError(f"placeholder {n.name} has no recorded shape; capture the model first")
                inputs.append(torch.randn(tuple(tm.shape), dtype=tm.dtype))
        return cls(example_inputs=tuple(inputs), **kwargs)  # type: ignore[arg-type]


class Pass(abc.ABC):
    """A graph rewrite: ``run`` takes a graph and a context and returns a graph."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset({CAPTURED, SHAPES})
    guarantees: ClassVar[frozenset[str]] = frozenset()
    invalidates: ClassVar[frozenset[str]] = frozenset()
    # runs on one torch thread: its result rests on float reductions (batch statistics, gradient sums) whose order
    # would otherwise follow the machine's thread count, and it must be the same on every machine
    single_threaded: ClassVar[bool] = False

    @abc.abstractmethod
    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        """Rewrite ``gm`` (in place or not) and return the result."""

    def __call__(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> fx.GraphModule:
        """Run this pass alone, with a default context when none is given."""
        ctx = ctx or PassContext.for_graph(gm)
        return Pipeline([self]).run_graph(gm, ctx)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch limited to one thread for the block (then restored)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def lint(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Structural checks every pass must leave true: a valid graph, shapes where promised, typed annotations."""
    gm.graph.lint()
    for n in gm.graph.nodes:
        recorded = "tensor_meta" in n.meta or "type" in n.meta  # non-tensor values (sizes) have a type only
        if SHAPES in ctx.properties and n.op not in ("output", "get_attr") and not recorded:
            raise PipelineError(f"node {n.name} ({n.op} {n.target}) has no shape although shapes are promised")
        ann = n.meta.get(META_KEY)
        if ann is not None and not isinstance(ann, NodeQuant):
            raise PipelineError(f"node {n.name}: meta[{META_KEY!r}] holds {type(ann).__name__}, not NodeQuant")
    for n in compute_nodes(gm):
        ann = n.meta.get(META_KEY)
        if PRECISION in ctx.properties and (ann is None or ann.precision is None or ann.weight is None):
            raise PipelineError(f"compute node {n.name} has no precision although precision is promised")
        if COST in ctx.properties and (ann is None or ann.cost is None):
            raise PipelineError(f"compute node {n.name} has no cost although costs are promised")


@dataclass
class PipelineResult:
    graph_module: fx.GraphModule
    context: PassContext


class Pipeline:
    """Run passes in order; ``dump_after`` names passes after which ``dump`` receives the printed graph."""

    def __init__(
        self,
        passes: Sequence[Pass],
        dump_after: Iterable[str] = (),
        dump: Callable[[str], None] = print,
    ) -> None:
        self.passes = list(passes)
        names = [p.name for p in self.passes]
        self.dump_after = set(dump_after)
        unknown = self.dump_after - set(names) - {"all"}
        if unknown:
            raise PipelineError(
                f"cannot dump after {', '.join(sorted(unknown))}: not in this pipeline ({', '.join(names) or 'empty'})"
            )
        self.dump = dump

    def check(self, properties: set[str]) -> None:
        """Fail before running anything if some pass's requirements cannot be met in this order."""
        props = set(properties)
        for p in self.passes:
            missing = p.requires - props
            if missing:
                providers = [q.name for q in self.passes if q.guarantees & missing]
                hint = f"; run {', '.join(providers)} before it" if providers else ""
                raise PipelineError(f"pass {p.name} requires {', '.join(sorted(missing))}{hint}")
            props = (props - p.invalidates) | p.guarantees

    def run(
        self,
        model: nn.Module,
        example_inputs: torch.Tensor | Sequence[torch.Tensor],
        ctx: PassContext | None = None,
        leaf_modules: Iterable[LeafSpec] = (),
        **ctx_fields: object,
    ) -> PipelineResult:
        """Capture ``model`` (a copy; yours is left untouched) and run every pass on the graph."""
        inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        gm = capture(model, inputs, leaf_modules=leaf_modules)
        ctx = ctx or PassContext(example_inputs=inputs, **ctx_fields)  # type: ignore[arg-type]
        gm = self.run_graph(gm, ctx)
        return PipelineResult(gm, ctx)

    def run_graph(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        """Run every pass on an already captured graph."""
        self.check(ctx.properties)
        lint(gm, ctx)
        for p in self.passes:
            start = time.perf_counter()
            with one_thread() if p.single_threaded else contextlib.nullcontext():
                gm = p.run(gm, ctx)
            ctx.timings.append((p.name, time.perf_counter() - start))
            ctx.properties = (ctx.properties - p.invalidates) | p.guarantees
            gm.recompile()
            try:
                lint(gm, ctx)
            except PipelineError as exc:
                raise PipelineError(f"after pass {p.name}: {exc}") from None
            except RuntimeError as exc:  # torch.fx's own Graph.lint
                raise PipelineError(f"after pass {p.name}: graph is malformed: {first_line(exc)}") from None
            if p.name in self.dump_after or "all" in self.dump_after:
                text = format_graph(gm) if p.name != "lower_integer" or ctx.ir is None else ctx.ir.summary()
                self.dump(f"--- graph after {p.name} ---\n{text}")
        return gm
