"""Recipes (named precision plans) and per-layer overrides, validated against the captured graph."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import tomllib

from qcompile.errors import RecipeError
from qcompile.quantization.spec import BF16, Calibrator, LayerRole, Precision

SUPPORTED_INT_BITS = range(2, 9)  # what the integer IR and every backend can hold (8-bit containers at most)


@dataclass(frozen=True)
class Recipe:
    """A default precision for every compute layer, with the first/last layers optionally kept wider."""

    name: str
    description: str
    default: Precision
    first: Precision | None = None
    last: Precision | None = None
    act_calibrator: Calibrator = Calibrator.EMA_MAX
    residual_bits: int = 8  # residual-add tensors and the operands of products of two tensors
    searched: bool = False
    """Widths are chosen per layer by the mixed-precision search (passes/mixed_precision.py) under a budget;
    ``default``/``first``/``last`` are only the starting point."""

    @property
    def quantized(self) -> bool:
        return not (self.default.is_float and (self.first or BF16).is_float and (self.last or BF16).is_float)

    def precision_for(self, roles: frozenset[LayerRole]) -> Precision:
        """Role-based precision: FIRST wins over LAST when a layer is both (a single-layer model)."""
        if LayerRole.FIRST in roles and self.first is not None:
            return self.first
        if LayerRole.LAST in roles and self.last is not None:
            return self.last
        return self.default


def activation_calibrator(recipe: Recipe, override: Calibrator | None = None) -> Calibrator:
    """The activation calibrator of a quantizer: a layer's override if any, else the recipe's. The one place the
    recipe's calibrator is read when choosing quantizer specs (``assign_precision``, ``insert_quantizers``)."""
    return override or recipe.act_calibrator


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("bf16", "baseline: no quantization, bf16 cost", BF16),
        Recipe("int8", "W8A8 everywhere", Precision(8, 8)),
        Recipe(
            "mostly4bit",
            "all conv/dense 4-bit; first conv and last dense 8-bit (the paper's recipe)",
            Precision(4, 4),
            first=Precision(8, 8),
            last=Precision(8, 8),
            # measured on the ResNet-20 checkpoint, full CIFAR-10 test split, 512 calibration images:
            # ema_max 84.48%, mse 85.37%, percentile 85.62% (float 86.99%)
            act_calibrator=Calibrator.PERCENTILE,
        ),
        # percentile as for mostly4bit: 84.80% against ema_max's 83.47% on the same checkpoint and data
        Recipe("int4", "W4A4 everywhere, first and last layers included", Precision(4, 4),
               act_calibrator=Calibrator.PERCENTILE),
        # widths chosen per layer by the mixed-precision search (passes/mixed_precision.py) under --budget
        Recipe("auto", "per-layer widths from an integer program under --budget (or --max-degradation)",
               Precision(8, 8), act_calibrator=Calibrator.PERCENTILE, searched=True),
    )
}


def get_recipe(name: str) -> Recipe:
    """Look a recipe up by name, or fail with the list of valid names."""
    try:
        return RECIPES[name]
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}") from None


_WA = re.compile(r"^w(\d+)a(\d+)$")


def parse_precision(value: object, where: str) -> Precision:
    """``8`` / ``"8"`` (weights and activations), ``"w4a8"``, or ``"bf16"``; checked against what backends hold."""
    text = str(value).strip().lower()
    if text in ("bf16", "16"):
        return BF16
    m = _WA.match(text)
    if m:
        w, a = int(m.group(1)), int(m.group(2))
    elif text.isdigit():
        w = a = int(text)
    else:
        raise RecipeError(f"{where}: cannot parse precision {value!r}; use a bit width (4, 8), 'w4a8' or 'bf16'")
    for kind, bits in (("weight", w), ("activation", a)):
        if bits not in SUPPORTED_INT_BITS:
            raise RecipeError(
                f"{where}: {kind} bit width {bits} cannot be honoured; integer layers take "
                f"{SUPPORTED_INT_BITS.start}..{SUPPORTED_INT_BITS.stop - 1} bits (or 'bf16')"
            )
    return Precision(w, a)


def parse_calibrator(value: str, where: str) -> Calibrator:
    """An activation calibrator by name: ema_max, max, percentile, mse."""
    choices = [c.value for c in Calibrator if c not in (Calibrator.NONE,)]
    if value not in choices:
        raise RecipeError(f"{where}: unknown calibrator {value!r}; choose one of: {', '.join(choices)}")
    return Calibrator(value)


@dataclass(frozen=True)
class Override:
    """``pattern`` (fnmatch over layer names such as ``layer1.*``) → precision and/or calibrator; later wins."""

    pattern: str
    precision: Precision | None
    source: str
    calibrator: Calibrator | None = None


@dataclass(frozen=True)
class LayerChoice:
    """What the overrides decided for one layer; None leaves the recipe's choice."""

    precision: Precision | None = None
    calibrator: Calibrator | None = None


def parse_override_value(pattern: str, value: object, source: str) -> Override:
    """``8``, ``w4a8``, ``bf16``, ``mse``, or ``4:mse`` (precision and activation calibrator)."""
    precision, calibrator = None, None
    for token in str(value).split(":"):
        token = token.strip().lower()
        if token in {c.value for c in Calibrator}:
            calibrator = parse_calibrator(token, source)
        else:
            precision = parse_precision(token, source)
    return Override(pattern, precision, source, calibrator)


def parse_set(items: Iterable[str], where: str = "set") -> list[Override]:
    """Parse ``PATTERN=VALUE`` items. ``where`` names where they came from (the CLI passes its flag), as for
    :func:`parse_calibrator`: each override keeps it as its source, for the errors that name it later."""
    out = []
    for item in items:
        pattern, sep, value = item.partition("=")
        if not sep or not pattern.strip() or not value.strip():
            raise RecipeError(f"{where} {item!r}: expected PATTERN=BITS, e.g. {where} 'layer1.*=8'")
        out.append(parse_override_value(pattern.strip(), value, f"{where} {item}"))
    return out


def load_overrides(path: str | Path) -> list[Override]:
    """Read overrides from TOML or JSON: a flat ``{pattern: bits}`` table, or one under an ``overrides`` key."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise RecipeError(f"cannot read overrides file {p}: {exc.strerror}") from None
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RecipeError(f"overrides file {p} is not valid {p.suffix.lstrip('.').upper() or 'TOML'}: {exc}") from None
    if isinstance(data, Mapping) and isinstance(data.get("overrides"), Mapping):
        data = data["overrides"]
    if not isinstance(data, Mapping):
        raise RecipeError(f"overrides file {p}: expected a table of pattern = bits")
    return [parse_override_value(str(k), v, f"{p} [{k}]") for k, v in data.items()]


def resolve_overrides(layer_names: Iterable[str], overrides: Iterable[Override]) -> dict[str, LayerChoice]:
    """Map each layer an override matches to its choice; an override that matches no layer is an error."""
    names = list(layer_names)
    plan: dict[str, LayerChoice] = {}
    for ov in overrides:
        hits = [n for n in names if fnmatch.fnmatchcase(n, ov.pattern)]
        if not hits:
            raise RecipeError(
                f"override {ov.pattern!r} ({ov.source}) matches no layer; layers are named like "
                f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
            )
        for n in hits:
            old = plan.get(n, LayerChoice())
            plan[n] = LayerChoice(ov.precision or old.precision, ov.calibrator or old.calibrator)
    return plan
