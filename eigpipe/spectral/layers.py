"""Layer selection: which modules of a model are analysed (presets, path globs, Type:glob selectors)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from eigpipe.errors import EigpipeError
from eigpipe.models.taps import NO_FEATURE_TENSOR, feature_tap, runs_per_region

# (selector, must match something). FPN outputs are absent from classifiers, so that part is optional.
PRESETS: dict[str, tuple[tuple[str, bool], ...]] = {
    "default": (("Conv2d:*body.*", True), ("Bottleneck:*body.layer*", True), ("*fpn.layer_blocks.?", False)),
}


@dataclass
class Layer:
    """One analysed feature map: ``name`` is the selected module's path, ``tap`` the module hooked."""

    name: str
    tap: str
    module_type: str
    per_region: bool = False
    forward_index: int = -1
    feature_shape: list[int] = field(default_factory=list)
    mapped_from: str = ""  # the layer whose statistics this one's are mapped from (eigpipe.spectral.affine)


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _matches(selector: str, path: str, module: nn.Module) -> bool:
    if ":" in selector:
        type_name, glob = selector.split(":", 1)
        return type_name in _class_names(module) and fnmatch.fnmatchcase(path, glob)
    return fnmatch.fnmatchcase(path, selector)


def _expand(selectors: Sequence[str]) -> list[tuple[str, bool]]:
    expanded: list[tuple[str, bool]] = []
    for sel in selectors:
        expanded.extend(PRESETS.get(sel, ((sel, True),)))
    return expanded


def select_layers(
    model: nn.Module, selectors: Sequence[str], own_outputs: bool = False, where: str = "covariance.layers"
) -> list[Layer]:
    """Layers chosen by the selectors (preset, ``GLOB`` or ``Type:GLOB``), in module-registration order. Each is
    measured at its feature tap (eigpipe.models.taps), or at the selected module's own output (``own_outputs``);
    ``where`` names the selectors' origin in errors."""
    if isinstance(selectors, str) or not isinstance(selectors, Sequence) or not selectors:
        raise EigpipeError(f"{where}: no list of layer selectors given")
    bad = [sel for sel in selectors if not isinstance(sel, str) or not sel]
    if bad:
        raise EigpipeError(f"{where}: {bad[0]!r} is not a selector (a module-path glob, Type:glob or preset name)")
    modules = [(path, m) for path, m in model.named_modules() if path]
    chosen: dict[str, nn.Module] = {}
    for sel, required in _expand(selectors):
        hits = [(path, m) for path, m in modules if _matches(sel, path, m)]
        if not hits and required:
            raise EigpipeError(f"{where}: selector {sel!r} matches no module of the model")
        chosen.update(hits)
    whole = next(((path, m) for path, m in chosen.items() if isinstance(m, NO_FEATURE_TENSOR)), None)
    if whole is not None:
        raise EigpipeError(
            f"{where}: {whole[0]} ({type(whole[1]).__name__}) is selected, but its output is no feature tensor; "
            "select the modules inside it (e.g. 'Conv2d:*')"
        )
    order = {path: i for i, (path, _) in enumerate(modules)}
    return [
        Layer(
            name=path,
            tap=path if own_outputs else feature_tap(model, path),
            module_type=type(m).__name__,
            per_region=runs_per_region(model, path),
        )
        for path, m in sorted(chosen.items(), key=lambda kv: order[kv[0]])
    ]
