"""eigpipe's public face for any PyTorch model: ``eigpipe.track`` hooks the selected layers while the user's own
code runs the model, and gives the spectrum table or a covariance store that the CLI stages read.

```python
with eigpipe.track(model, layers=["Conv2d:*", "encoder.layers.*.mlp.0"]) as tracker:
    for images, _ in loader:
        model(images)
table = tracker.spectra()      # pandas: one row per layer, every measure of `eigpipe spectrum`
tracker.save("run.zarr")       # a covariance store for `eigpipe spectrum`, `dimensions` and `report`
```

A batch is one call of the tracked module (``every=K`` takes every K-th). Features come from the same extraction
path as the ``covariance`` stage (eigpipe.spectral.features). Under torch.distributed, ``spectra()`` and
``save()`` are collective: every rank calls them, each rank's statistics are merged exactly, rank 0 writes.
"""

from __future__ import annotations

import fnmatch
import json
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from eigpipe import config, provenance
from eigpipe.errors import EigpipeError, require_whole, whole
from eigpipe.models.taps import built_by_eigpipe
from eigpipe.outputs import claim_outputs
from eigpipe.spectral import spectrum, store
from eigpipe.spectral.accumulator import PRECISIONS, CovarianceAccumulator
from eigpipe.spectral.extract import MATRIX, layer_attrs
from eigpipe.spectral.features import CONCURRENT, FeatureHooks, merge_ranks
from eigpipe.spectral.layers import Layer, select_layers
from eigpipe.spectral.layouts import Layout, channels_last

TAPS = ("auto", "pipeline", "output")
PerLayer = int | Mapping[str, int] | None  # one value for every layer, or {layer-name glob: value}


def _check_per_layer(name: str, option: object) -> None:
    """A per-layer option is None, a whole number, or {layer glob: whole number}."""
    values = option.items() if isinstance(option, Mapping) else [("*", option)] if option is not None else []
    for glob, value in values:
        if not isinstance(glob, str) or not whole(value):
            raise EigpipeError(f"{name}: {option!r} is not a whole number or a {{layer glob: whole number}} dict")


def _check_globs_match(name: str, option: PerLayer, layers: list[str]) -> None:
    """A {layer glob: value} option whose glob matches no selected layer is a typo that would silently apply nothing."""
    for glob in option if isinstance(option, Mapping) else ():
        if not any(fnmatch.fnmatchcase(layer, glob) for layer in layers):
            shown = ", ".join(layers[:3]) + (", ..." if len(layers) > 3 else "")
            raise EigpipeError(f"{name}: {glob!r} matches none of the selected layers ({shown})")


def _for_layer(option: PerLayer, name: str) -> int | None:
    if option is None or isinstance(option, int):
        return option
    return next((value for glob, value in option.items() if fnmatch.fnmatchcase(name, glob)), None)


class Tracker:
    """Hooks on the selected layers of ``model``, active inside ``with``; see ``eigpipe.track``."""

    def __init__(
        self,
        model: nn.Module,
        layers: str | Sequence[str],
        *,
        every: int = 1,
        precision: str = "float64",
        tap: str = "auto",
        channel_axis: PerLayer = None,
        output_index: PerLayer = None,
        prefix_tokens: int = 0,
        prefix: str = "drop",
        run: str | None = None,
    ) -> None:
        require_whole("every", every, 1)
        if precision not in PRECISIONS:
            raise EigpipeError(f"precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
        if tap not in TAPS:
            raise EigpipeError(f"tap: {tap!r} is not one of {', '.join(TAPS)}")
        _check_per_layer("channel_axis", channel_axis)
        _check_per_layer("output_index", output_index)
        if run is not None and (not isinstance(run, str) or not run):
            raise EigpipeError(f"run: {run!r} is not a name")
        if isinstance(model, torch.jit.ScriptModule):
            raise EigpipeError(
                "eigpipe.track: a scripted model (torch.jit) runs no hooks; track the model before scripting it"
            )
        own = tap == "output" or (tap == "auto" and not built_by_eigpipe(model))
        self.model, self.every, self.precision = model, every, precision
        layers = [layers] if isinstance(layers, str) else layers
        self.selectors = list(layers) if isinstance(layers, Iterable) else layers  # select_layers names what is wrong
        self.run = run or type(model).__name__
        self.settings = {"every": every, "precision": precision, "tap": "output" if own else "pipeline"}
        self.settings.update(channel_axis=channel_axis, output_index=output_index, prefix_tokens=prefix_tokens)
        self.settings["prefix"] = prefix
        Layout(prefix_tokens=prefix_tokens, prefix=prefix)  # checks the token policy now

        def layout(name: str) -> Layout:
            axis, index = _for_layer(channel_axis, name), _for_layer(output_index, name)
            if axis is None and own and channels_last(model.get_submodule(name)):
                axis = -1
            return Layout(channel_axis=axis, output_index=index, prefix_tokens=prefix_tokens, prefix=prefix)

        selected = select_layers(model, self.selectors, own_outputs=own, where="layers")
        for option, value in (("channel_axis", channel_axis), ("output_index", output_index)):
            _check_globs_match(option, value, [layer.name for layer in selected])
        self.hooks = FeatureHooks(model, selected, precision, layouts=layout)
        self.forwards = 0  # calls of the tracked module, taken or not
        self._depth = 0
        self._thread: int | None = None  # the thread of the forward pass in progress
        self._inside = False
        self._batches_at_reset = 0
        self._merged: tuple[int, list[Layer], dict[str, CovarianceAccumulator]] | None = None

    # ---- hooks on the tracked module: batch boundaries ---------------------------------------------
    def __enter__(self) -> Tracker:
        if self._inside:
            raise EigpipeError("eigpipe.track: this tracker is already active (a with block inside its own)")
        self._inside = True
        self.hooks.__enter__()
        try:
            self.hooks.keep(self.model.register_forward_pre_hook(self._begin))
            self.hooks.keep(self.model.register_forward_hook(self._end, always_call=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.hooks.__exit__()  # removes the boundary hooks too
        self._depth, self._thread, self._inside = 0, None, False

    def _begin(self, _module: nn.Module, _args: Any) -> None:
        thread = threading.get_ident()
        if self._depth and thread != self._thread:
            raise EigpipeError(f"eigpipe.track: {CONCURRENT}")
        self._thread = thread
        self._depth += 1
        if self._depth == 1:
            self.forwards += 1
            if (self.forwards - 1) % self.every == 0:
                self.hooks.begin_batch()

    def _end(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        if threading.get_ident() != self._thread:  # a concurrent pass, refused by _begin
            return
        self._depth -= 1
        if self._depth > 0:
            return
        if self.hooks.active:
            missing = self.hooks.end_batch()
            if missing and self.hooks.batches == 1:
                warnings.warn(
                    f"eigpipe.track: {len(missing)} selected layer(s) did not run in the first batch: "
                    f"{', '.join(missing)}",
                    stacklevel=2,
                )
        self.hooks.token_mask = None

    def mask_tokens(self, mask: torch.Tensor) -> None:
        """The [N, T] mask of real (True, 1) and padding (False, 0) tokens of the next forward pass's token layers."""
        try:
            mask = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise EigpipeError(f"mask_tokens: not a [N, T] mask ({exc})") from None
        if mask.dim() != 2:
            raise EigpipeError(f"mask_tokens: a mask of shape {tuple(mask.shape)}, not [N, T]")
        if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
            raise EigpipeError("mask_tokens: a mask holds True / False (or 1 / 0) only")
        self.hooks.token_mask = mask

    def reset(self) -> None:
        """Forget the statistics gathered so far (the hooks stay)."""
        self.hooks.streams.clear()
        self._merged = None
        self._batches_at_reset = self.hooks.batches

    @property
    def batches_taken(self) -> int:
        """Forward passes taken since the tracker started or was reset."""
        return self.hooks.batches - self._batches_at_reset

    # ---- results -----------------------------------------------------------------------------------
    def _results(self) -> tuple[list[Layer], dict[str, CovarianceAccumulator]]:
        """Layers in forward order and their accumulators, every rank's merged under torch.distributed."""
        if self._merged is None or self._merged[0] != self.hooks.batches:
            self._merged = (self.hooks.batches, *merge_ranks(*self.hooks.results()))
        return self._merged[1], self._merged[2]

    @property
    def layers(self) -> list[Layer]:
        return self._results()[0]

    @property
    def accumulators(self) -> dict[str, CovarianceAccumulator]:
        return self._results()[1]

    def root_attrs(self, iteration: int = 0) -> dict[str, Any]:
        """The covariance store's root attributes: what was measured, on what, and how."""
        accs = self.accumulators
        device = str(next(iter(accs.values())).device) if accs else "cpu"
        return {
            "run": self.run,
            "iteration": int(iteration),
            "init": None,
            "task": "library",
            "model_name": type(self.model).__name__,
            "n_images": max((acc.count for acc in accs.values()), default=0),
            "batches": self.hooks.batches,
            "selectors": self.selectors,
            "precision": self.precision,
            "tracker": self.settings,
            "matrix": MATRIX,
            "provenance": provenance.record(config=self.settings, seed=None, device=device),
        }

    def _arrays(self) -> dict[str, dict[str, np.ndarray]]:
        layers, accs = self._results()
        if not accs:
            taken = self.batches_taken
            if not taken:
                raise EigpipeError(
                    f"eigpipe.track: no statistics: no forward pass was taken since the tracker started or was reset "
                    f"(every={self.every})"
                )
            raise EigpipeError(
                f"eigpipe.track: no statistics: none of {', '.join(self.selectors)} ran in the {taken} batch(es) taken"
            )
        return {
            layer.name: {key: store.as_numpy(getattr(accs[layer.name], key)) for key in ("second_moment", "mean")}
            for layer in layers
            if layer.name in accs
        }

    def spectra(self, iteration: int = 0, **settings: Any) -> pd.DataFrame:
        """One row per layer with every measure of ``eigpipe spectrum``; ``settings`` are spectrum-section keys
        (threshold, relative_threshold, soft_lambda, saturation_threshold, alpha_ranks), validated by the schema."""
        require_whole("iteration", iteration, 0)
        cfg = config.validate(dict(settings), "spectrum", config.schema()["properties"]["spectrum"])
        spectrum.check_settings(cfg)
        root, (layers, accs) = self.root_attrs(iteration), self._results()
        tolerance = spectrum.negative_tolerance(self.precision)
        rows = []
        for name, arrays in self._arrays().items():
            attrs = layer_attrs(next(layer for layer in layers if layer.name == name), accs[name])
            row, _ = spectrum.layer_row(root, name, attrs, arrays, cfg, f"layer {name}", tolerance, _eigvalsh)
            rows.append(row)
        return spectrum.spectrum_table(rows)

    def save(self, path: str | Path, iteration: int = 0, attrs: dict | None = None) -> Path:
        """Publish the statistics as a covariance store (atomically); ``attrs`` are added to its root attributes
        (say, what data the model saw). Under torch.distributed, rank 0 writes."""
        path = Path(path).expanduser()
        require_whole("iteration", iteration, 0)
        arrays, own = self._arrays(), self.root_attrs(iteration)
        store.check_names(arrays)
        root = {**own, **_user_attrs(attrs, own)}
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if distributed and torch.distributed.get_rank() != 0:
            return path
        claim_outputs((path, store.COVARIANCE_STORE))
        layers, accs = self._results()
        per_layer = {layer.name: layer_attrs(layer, accs[layer.name]) for layer in layers if layer.name in accs}
        return store.write_store(path, store.COVARIANCE_KIND, arrays, root, per_layer)


def _user_attrs(attrs: Mapping[str, Any] | None, own: Mapping[str, Any]) -> dict[str, Any]:
    """The user's root attributes, checked: JSON values under new names (``init``, eigpipe's empty label of a
    run's starting point, may be set; what eigpipe records of the measurement may not be replaced)."""
    if attrs is None:
        return {}
    if not isinstance(attrs, Mapping):
        raise EigpipeError(f"attrs: give a dict of JSON values, not a {type(attrs).__name__}")
    reserved = (set(own) - {"init"}) | set(store.STORE_ATTRS)
    for key, value in attrs.items():
        if not isinstance(key, str):
            raise EigpipeError(f"attrs: the name {key!r} is not a string")
        if key in reserved:
            hint = {"run": " (give run= to eigpipe.track)", "iteration": " (give iteration= to save)"}.get(key, "")
            raise EigpipeError(f"attrs: {key} is recorded by eigpipe itself{hint}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise EigpipeError(f"attrs: {key}: {value!r} is not a JSON value (str, number, list, dict...)") from None
    return dict(attrs)


def _eigvalsh(matrix: np.ndarray) -> np.ndarray:
    """torch's eigvalsh, on torch's own threads: NumPy's BLAS threads, started in a process whose torch threads
    have just run, spin against them (on 2 busy cores, spectra() of ResNet-50's layers took 163 s with NumPy's)."""
    return torch.linalg.eigvalsh(torch.from_numpy(matrix)).numpy()


def track(model: nn.Module, layers: str | Sequence[str], **options: Any) -> Tracker:
    """Track the eigenspectra of ``model``'s selected layers while your code runs it; use with ``with``.

    layers: a selector or a list of them, as in ``eigpipe covariance --layers``: module-path globs
        (``"encoder.layers.*.mlp.0"``) or ``Type:glob`` (``"Conv2d:*"``). On a model eigpipe did not build, a
        layer's feature is the selected module's own output; on eigpipe's detectors and classifiers, the
        pipeline's feature taps (post-activation).
    every: take every K-th forward pass (default 1: all).
    precision: "float64" (exact) or "float32" Gram products (statistics stay float64).
    tap: "auto" (as above), "output" (always the module's own output) or "pipeline" (always the feature taps).
    channel_axis: where the channels are (default by rank: [N, C], [N, T, C] tokens, [N, C, H, W]); an int, or
        {layer glob: int}. output_index: the element of a tuple output to take (int or {layer glob: int}).
    prefix_tokens, prefix: how many leading tokens of [N, T, C] outputs are CLS/register tokens, and whether they
        are dropped ("drop", default), kept as ordinary tokens ("keep") or taken alone ("only").
    run: the run name the store and table record (default: the model's class name).
    """
    return Tracker(model, layers, **options)
