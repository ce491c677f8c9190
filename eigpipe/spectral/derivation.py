"""Width derivation: new ResNet widths from a dimensions table under a body-MACs budget (the `eigpipe widths` stage)."""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from eigpipe.errors import ConfigError, EigpipeError
from eigpipe.models.cost import body_cost, convs
from eigpipe.models.widths import Stage, WidthSpec, width_floor

BASE_MEASURES = ("intrinsic_dim", "relative_dim", "soft_dof", "effective_rank")
MEASURES = BASE_MEASURES + tuple("centered_" + m for m in BASE_MEASURES)
AGGREGATES: dict[str, Callable[[list[float]], float]] = {
    "max": max,
    "mean": statistics.fmean,
    "median": statistics.median,
}
TIED_FROM = ("block_output", "conv3")
REQUIRED_COLUMNS = ("run", "iteration", "canonical", "channels")


@dataclass
class Derivation:
    widths: WidthSpec
    alpha: float
    layers: list[dict[str, Any]] = field(default_factory=list)
    body: dict[str, dict[str, float]] = field(default_factory=dict)
    floor: int = 1
    zero: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Slot:
    """One independent width: the stem, a block's conv1/conv2, or a stage's tied out width."""

    key: tuple[int, int, int]  # (stage, block, which): stem (0, 0, 0); conv k of block (i, j, k); stage out (i, -1, 3)
    sources: tuple[str, ...]
    d: float
    values: tuple[float, ...] = ()
    original: int = 0
    floor: int = 1  # the narrowest width it may get: min_width, and min_ratio x original, rounded up to the multiple


def _check_table(table: pd.DataFrame, spec: WidthSpec, measure: str) -> dict[str, pd.Series]:
    if measure not in MEASURES:
        raise ConfigError(f"widths.measure: unknown measure {measure!r}; accepted: {', '.join(MEASURES)}")
    missing = [c for c in (*REQUIRED_COLUMNS, measure) if c not in table.columns]
    if missing:
        hint = " (re-run the spectrum stage to add it)" if measure in missing else ""
        raise EigpipeError(f"dimensions table: no column {', '.join(missing)}{hint}")
    if table.empty:
        raise EigpipeError("dimensions table: no rows")
    snapshots = sorted({(str(r), int(i)) for r, i in zip(table["run"], table["iteration"], strict=True)})
    if len(snapshots) > 1:
        shown = ", ".join(f"{r}@{i}" for r, i in snapshots[:6]) + (" ..." if len(snapshots) > 6 else "")
        raise EigpipeError(f"dimensions table: holds {len(snapshots)} run/iteration snapshots ({shown}); give one")
    duplicated = table["canonical"][table["canonical"].duplicated()]
    if len(duplicated):
        raise EigpipeError(f"dimensions table: layer {duplicated.iloc[0]} appears more than once")
    rows = {str(row["canonical"]): row for _, row in table.iterrows()}
    # depths: highest block index per stage present in the table
    seen: dict[int, int] = {}
    for name in rows:
        parts = name.split(".")
        if parts[0].startswith("layer") and parts[0][5:].isdigit() and len(parts) > 1 and parts[1].isdigit():
            seen[int(parts[0][5:])] = max(seen.get(int(parts[0][5:]), 0), int(parts[1]) + 1)
    for i in sorted(set(seen) | set(range(1, len(spec.stages) + 1))):
        depth = spec.depths[i - 1] if i <= len(spec.stages) else 0
        if i in seen and seen[i] != depth:
            raise EigpipeError(
                f"dimensions table: another architecture: layer{i} has {seen[i]} blocks in the table, {depth} in "
                "the spec"
            )
    expected = {"conv1": spec.stem}
    for i, stage in enumerate(spec.stages, start=1):
        for j, (w1, w2) in enumerate(stage.blocks):
            name = f"layer{i}.{j}"
            expected.update({f"{name}.conv1": w1, f"{name}.conv2": w2, f"{name}.conv3": stage.out, name: stage.out})
            expected[f"{name}.downsample.0"] = stage.out
    for name, width in expected.items():
        if name in rows and int(rows[name]["channels"]) != width:
            raise EigpipeError(
                f"dimensions table: another architecture: {name} has {int(rows[name]['channels'])} channels in the "
                f"table, {width} in the spec"
            )
    return rows


def _value(rows: dict[str, pd.Series], name: str, measure: str) -> float:
    if name not in rows:
        raise EigpipeError(f"dimensions table: layer {name} is missing (the widths spec needs it)")
    value = float(rows[name][measure])
    if not math.isfinite(value) or value < 0:
        raise EigpipeError(f"dimensions table: layer {name} has {measure} = {value} (need a finite value >= 0)")
    return value


def _slots(rows: dict[str, pd.Series], spec: WidthSpec, measure: str, aggregate: str, tied_from: str) -> list[_Slot]:
    stem = _value(rows, "conv1", measure)
    slots = [_Slot((0, 0, 0), ("conv1",), stem, (stem,), spec.stem)]
    for i, stage in enumerate(spec.stages, start=1):
        for j, block in enumerate(stage.blocks):
            for k in (1, 2):
                name = f"layer{i}.{j}.conv{k}"
                value = _value(rows, name, measure)
                slots.append(_Slot((i, j, k), (name,), value, (value,), block[k - 1]))
        suffix = "" if tied_from == "block_output" else ".conv3"
        sources = tuple(f"layer{i}.{j}{suffix}" for j in range(len(stage.blocks)))
        values = [_value(rows, name, measure) for name in sources]
        slots.append(_Slot((i, -1, 3), sources, float(AGGREGATES[aggregate](values)), tuple(values), stage.out))
    return slots


def _round_up(value: float, multiple: int) -> int:
    """The smallest multiple of ``multiple`` >= value."""
    return multiple * math.ceil(value / multiple)


def _with_floors(slots: list[_Slot], multiple: int, min_width: int, min_ratio: float) -> list[_Slot]:
    return [replace(slot, floor=width_floor(slot.original, multiple, min_width, min_ratio)) for slot in slots]


def _rounded(slots: list[_Slot], alpha: float, multiple: int) -> dict[tuple[int, int, int], int]:
    """Each slot's alpha * d rounded to the nearest multiple, at least its floor."""
    return {slot.key: max(slot.floor, multiple * math.floor(alpha * slot.d / multiple + 0.5)) for slot in slots}


def _spec(slots: list[_Slot], alpha: float, multiple: int, like: WidthSpec) -> WidthSpec:
    return _build(_rounded(slots, alpha, multiple), like)


def _fill(
    slots: list[_Slot], alpha: float, multiple: int, like: WidthSpec, fits: Callable[[WidthSpec], bool]
) -> WidthSpec:
    """Largest-remainder rounding under the budget: the widths ``alpha`` rounds down go up one multiple, the
    largest fraction of a multiple first, wherever the body still ``fits``. Every width stays alpha * d rounded
    down or up, so widths stay proportional to d while the budget's slack (what the shared steps leave) is spent.
    Passes repeat until none widens anything: a width that reaches its stage's input width removes layer1's
    downsample conv, so MACs can fall and let a width refused earlier fit.
    """
    widths = _rounded(slots, alpha, multiple)
    fractions = {slot.key: alpha * slot.d / multiple - math.floor(alpha * slot.d / multiple) for slot in slots}
    pending = sorted((s for s in slots if widths[s.key] < alpha * s.d), key=lambda s: -fractions[s.key])
    while pending:
        refused = []
        for slot in pending:
            widths[slot.key] += multiple
            if not fits(_build(widths, like)):
                widths[slot.key] -= multiple
                refused.append(slot)
        if len(refused) == len(pending):
            break
        pending = refused
    return _build(widths, like)


def _build(widths: dict[tuple[int, int, int], int], like: WidthSpec) -> WidthSpec:
    stages = tuple(
        Stage(out=widths[(i, -1, 3)], blocks=tuple((widths[(i, j, 1)], widths[(i, j, 2)]) for j in range(depth)))
        for i, depth in enumerate(like.depths, start=1)
    )
    return WidthSpec(stem=widths[(0, 0, 0)], stages=stages)


def _position(name: str) -> tuple[int, int, int]:
    """(stage, block, conv) of a conv's canonical name: the stem is (0, 0, 0), a downsample is conv 4."""
    if name == "conv1":
        return 0, 0, 0
    parts = name.split(".")
    return int(parts[0][5:]), int(parts[1]), 4 if parts[2] == "downsample" else int(parts[2][-1])


def _layers(original: WidthSpec, derived: WidthSpec, slots: list[_Slot], size: tuple[int, int]) -> list[dict]:
    """Per conv of either body (a downsample exists only where in != out): measure, widths, params, MACs."""
    by_key = {slot.key: slot for slot in slots}
    old = {name: rest for name, *rest in convs(original, *size)}
    new = {name: rest for name, *rest in convs(derived, *size)}
    layers = []
    for name in sorted(old.keys() | new.keys(), key=_position):
        i, j, k = _position(name)
        slot = by_key[(i, j, k) if k in (0, 1, 2) and (i, j, k) in by_key else (i, -1, 3)]
        entry: dict[str, Any] = {"name": name, "source": ",".join(slot.sources), "d": slot.d, "floor": slot.floor}
        costs: dict[str, int] = {}
        for which, found in (("original", old), ("derived", new)):
            cin, cout, kernel, positions = found.get(name, (0, None, 0, 0))
            entry[which] = cout  # None: no such conv in that body (a downsample exists only where in != out)
            costs[f"params_{which}"] = cin * (cout or 0) * kernel * kernel + 2 * (cout or 0)
            costs[f"macs_{which}"] = cin * (cout or 0) * kernel * kernel * positions
        layers.append({**entry, **dict(sorted(costs.items()))})
    return layers


def widths_at(
    table: pd.DataFrame,
    spec: WidthSpec,
    alpha: float,
    *,
    measure: str = "intrinsic_dim",
    multiple: int = 8,
    min_width: int = 8,
    aggregate: str = "max",
    tied_from: str = "block_output",
    min_ratio: float = 0.0,
) -> WidthSpec:
    """The widths a given alpha assigns (no budget): what derive_widths bisects over."""
    slots = _slots(_check_table(table, spec, measure), spec, measure, aggregate, tied_from)
    return _spec(_with_floors(slots, multiple, min_width, min_ratio), alpha, multiple, spec)


def derive_widths(
    table: pd.DataFrame,
    spec: WidthSpec,
    *,
    measure: str = "intrinsic_dim",
    multiple: int = 8,
    min_width: int = 8,
    macs_budget: float = 1.0,
    input_size: tuple[int, int] = (224, 224),
    aggregate: str = "max",
    tied_from: str = "block_output",
    fill: bool = True,
    min_ratio: float = 0.0,
) -> Derivation:
    """Widths alpha * d rounded to ``multiple`` (at least ``min_width`` and ``min_ratio`` x the original width),
    with the largest global alpha whose body MACs at ``input_size`` stay within ``macs_budget`` x the original's;
    with ``fill``, widths that alpha rounds down then go up one multiple while the budget allows (largest remainder
    first). ``table`` is one run's one snapshot."""
    if aggregate not in AGGREGATES:
        raise ConfigError(f"widths.aggregate: unknown {aggregate!r}; accepted: {', '.join(AGGREGATES)}")
    if tied_from not in TIED_FROM:
        raise ConfigError(f"widths.tied_from: unknown {tied_from!r}; accepted: {', '.join(TIED_FROM)}")
    if multiple < 1 or min_width < 1 or not macs_budget > 0 or not 0 <= min_ratio <= 1:
        raise ConfigError(
            "widths: need multiple >= 1, min_width >= 1, macs_budget > 0, 0 <= min_ratio <= 1 "
            f"({multiple}, {min_width}, {macs_budget}, {min_ratio})"
        )
    height, width = (int(v) for v in input_size)
    rows = _check_table(table, spec, measure)
    slots = _with_floors(_slots(rows, spec, measure, aggregate, tied_from), multiple, min_width, min_ratio)
    floor = _round_up(min_width, multiple)
    original_params, original_macs = body_cost(spec, height, width)
    budget = macs_budget * original_macs

    def macs(alpha: float) -> int:
        return body_cost(_spec(slots, alpha, multiple, spec), height, width)[1]

    if macs(0.0) > budget:
        floors = f"the floor {floor}" + (f" or {min_ratio} x its original width" if min_ratio else "")
        raise EigpipeError(
            f"widths: the budget cannot be met: the smallest body MACs (every width at {floors}) are "
            f"{macs(0.0):,}, the budget is {budget:,.0f} ({macs_budget} x {original_macs:,})"
        )
    lo, hi = 0.0, 1.0
    if any(slot.d > 0 for slot in slots):
        while macs(hi) <= budget:  # bracket: MACs grow without bound with alpha
            lo, hi = hi, hi * 2
            if math.isinf(hi):
                raise EigpipeError("widths: alpha diverges (measures too small to reach the budget)")
        while True:  # MACs(alpha) is a non-decreasing step function: bisect down to adjacent floats
            mid = lo + (hi - lo) / 2
            if mid <= lo or mid >= hi:
                break
            lo, hi = (mid, hi) if macs(mid) <= budget else (lo, mid)
    if fill:
        derived = _fill(slots, lo, multiple, spec, lambda s: body_cost(s, height, width)[1] <= budget)
    else:
        derived = _spec(slots, lo, multiple, spec)
    params, derived_macs = body_cost(derived, height, width)
    zero = [name for slot in slots if slot.d == 0 for name, v in zip(slot.sources, slot.values, strict=True) if v == 0]
    if zero:
        print(
            f"warning: widths: {measure} is 0 at {', '.join(zero)}: their convs get their floor width "
            f"({floor}" + (f", or {min_ratio} x the original" if min_ratio else "") + ")",
            file=sys.stderr,
        )
    return Derivation(
        widths=derived,
        alpha=lo,
        layers=_layers(spec, derived, slots, (height, width)),
        body={
            "original": {"params": original_params, "macs": original_macs},
            "derived": {"params": params, "macs": derived_macs},
            "ratio": {"params": params / original_params, "macs": derived_macs / original_macs},
        },
        floor=floor,
        zero=zero,
    )


# -- the stage ----------------------------------------------------------------------------------------------
