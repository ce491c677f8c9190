"""Feature covariance of selected layers: forward hooks feeding a streaming float64 accumulator.

The paper's matrix for a layer with C channels is Sigma = (1/n) sum_i (1/(H_i W_i)) sum_xy F_ixy F_ixy^T:
averaged over each image's positions first, then over the n images. It is never built from stored
features: each batch is folded into an O(C^2) accumulator on the model's device.
"""

from __future__ import annotations

import fnmatch
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eigpipe.errors import EigpipeError, NumericalError

FeatureBatch = torch.Tensor | Sequence[torch.Tensor]


class NonFiniteFeature(ValueError):
    """Raised by ``CovarianceAccumulator.update``; ``index`` is the offending image within the update."""

    def __init__(self, index: int) -> None:
        super().__init__(f"non-finite feature in image {index} of the batch")
        self.index = index


# --------------------------------------------------------------------------------------------------
# Streaming accumulator
# --------------------------------------------------------------------------------------------------


class Workspace:
    """A reusable float64 scratch buffer: one per extraction, shared by all layers' accumulators.

    Updates run one after another, so one buffer the size of the largest batch suffices; reusing it
    avoids a fresh allocation (and its page faults) per layer and batch.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.device, torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self._buffers.get(device)
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):  # usable in and out of inference mode
                buf = self._buffers[device] = torch.empty(numel, dtype=torch.float64, device=device)
        return buf[:numel].view(shape)


class CovarianceAccumulator:
    """Per-image-weighted mean, uncentred second moment and centred covariance of [C, H, W] features.

    Kept robustly (exact to float64 round-off even for features with a large common offset): each
    image is centred by its own mean, and the per-image means are combined with Welford/Chan. The one
    [C, C] state is ``scatter`` = W + M2, where W = sum_i (1/P_i) sum_xy (F - m_i)(F - m_i)^T and
    M2 = sum_i (m_i - mu)(m_i - mu)^T; covariance = scatter / n and second_moment = covariance + mu mu^T.
    Only the lower triangle of ``scatter`` is authoritative: for wide layers the Gram matrix is built
    block by block below the diagonal (about half the multiply-adds).
    """

    BLOCK = 256  # block of the triangular Gram update; narrower layers (< 2 blocks) take one full GEMM

    @classmethod
    def block_size(cls, channels: int) -> int:
        # measured on CPU: splitting pays only for wide layers, and 256 beats 128 and 512 there
        return cls.BLOCK if channels >= 2 * cls.BLOCK else channels

    def __init__(
        self, channels: int, device: torch.device | str | None = None, workspace: Workspace | None = None
    ) -> None:
        self.channels = int(channels)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.workspace = workspace
        self._n = 0
        self.positions = 0
        # normal tensors even when created under inference_mode (hooks), so a later merge can update them
        with torch.inference_mode(False):
            self._mu = torch.zeros(self.channels, dtype=torch.float64, device=self.device)
            self._scatter = torch.zeros(self.channels, self.channels, dtype=torch.float64, device=self.device)

    # ---- feeding ------------------------------------------------------------------------------
    def update(self, features: FeatureBatch) -> None:
        """Add images: one [C, H, W], a batch [N, C, H, W], or a list of [C, H_i, W_i] (any sizes).

        Raises NonFiniteFeature (with the image's index in this update) before changing any state.
        """
        if isinstance(features, torch.Tensor):
            if features.dim() == 3:
                features = features.unsqueeze(0)
            if features.dim() != 4:
                raise ValueError(f"features must be [C,H,W] or [N,C,H,W], got shape {tuple(features.shape)}")
            self._update_batch(features, list(range(features.shape[0])))
            return
        groups = _group_by_shape(features)
        if len(groups) == 1:
            self._update_batch(groups[0][1], groups[0][0])
            return
        partial = CovarianceAccumulator(self.channels, self.device, self.workspace)
        for indices, batch in groups:  # all sizes into a partial sum first: a bad image changes nothing
            partial._update_batch(batch, indices)
        self.merge(partial)

    def _update_batch(self, batch: torch.Tensor, indices: list[int]) -> None:
        """Fold N equal-sized images into the state with one (block-triangular) float64 GEMM.

        The operand is [C, N*P + N + 1]: the features centred per image, then the per-image mean
        deviations from the batch mean and Chan's cross term, both scaled by sqrt(P) so that the one
        GEMM with alpha 1/P adds W_batch + M2_batch + n_a n_b/(n_a+n_b) delta delta^T to the scatter.
        """
        n, c, h, w = batch.shape
        p = h * w
        if c != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {c}")
        if p == 0:
            raise ValueError("features with no spatial positions")
        shape = (c, n * p + n + 1)
        operand = self.workspace.get(shape, self.device) if self.workspace is not None else None
        operand = torch.empty(shape, dtype=torch.float64, device=self.device) if operand is None else operand
        x = operand[:, : n * p].view(c, n, p)
        x.copy_(batch.detach().reshape(n, c, p).permute(1, 0, 2))
        means = x.mean(dim=2)  # [C, N]
        if not math.isfinite(float(means.sum())):  # NaN or Inf anywhere makes the sum non-finite
            bad = ~torch.isfinite(means).all(dim=0)
            raise NonFiniteFeature(indices[int(bad.nonzero()[0, 0])])
        x.sub_(means.unsqueeze(2))
        batch_mu = means.mean(dim=1)
        total = self._n + n
        delta = batch_mu - self._mu
        root_p = math.sqrt(p)
        torch.sub(means, batch_mu.unsqueeze(1), out=operand[:, n * p : n * p + n]).mul_(root_p)
        torch.mul(delta, root_p * math.sqrt(self._n * n / total), out=operand[:, -1])
        self._gram(operand, alpha=1.0 / p)
        self._mu.add_(delta, alpha=n / total)
        self._n = total
        self.positions += n * p

    def _gram(self, operand: torch.Tensor, alpha: float) -> None:
        """scatter += alpha * operand operand^T, lower block triangle only for wide layers."""
        c = operand.shape[0]
        block = self.block_size(c)
        for i in range(0, c, block):
            for j in range(0, i + 1, block):
                rows, cols = operand[i : i + block], operand[j : j + block]
                self._scatter[i : i + block, j : j + block].addmm_(rows, cols.T, alpha=alpha)

    def _merge_stats(self, n_b: int, mu_b: torch.Tensor, scatter_b: torch.Tensor) -> None:
        """Chan et al.'s pairwise update of (count, mean, scatter) with another set's statistics."""
        if n_b == 0:
            return
        n_a = self._n
        total = n_a + n_b
        delta = mu_b - self._mu
        self._mu.add_(delta, alpha=n_b / total)
        self._scatter += scatter_b
        self._scatter.addr_(delta, delta, alpha=n_a * n_b / total)
        self._n = total

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Fold another partial accumulator (other images of the same layer) into this one."""
        if other.channels != self.channels:
            raise ValueError(f"cannot merge {other.channels} channels into {self.channels}")
        self._merge_stats(other._n, other._mu.to(self.device), other._scatter.to(self.device))
        self.positions += other.positions
        return self

    # ---- state (DDP gather, resuming) -----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "count": self._n,
            "positions": self.positions,
            "mean": self._mu.cpu(),
            "scatter": self._symmetric().cpu(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str | None = None) -> CovarianceAccumulator:
        acc = cls(state["channels"], device)
        acc._n = int(state["count"])
        acc.positions = int(state["positions"])
        acc._mu.copy_(state["mean"])
        acc._scatter.copy_(state["scatter"])
        return acc

    # ---- results --------------------------------------------------------------------------------
    def _symmetric(self) -> torch.Tensor:
        """The full symmetric scatter (a new tensor), mirrored from its authoritative lower part."""
        b = self.block_size(self.channels)
        if b == self.channels:  # the whole Gram matrix was computed
            return (self._scatter + self._scatter.T).div_(2)
        full = self._scatter.clone()
        for i in range(b, self.channels, b):
            full[:i, i : i + b].copy_(full[i : i + b, :i].T)
        return full

    @property
    def count(self) -> int:
        """Images seen."""
        return self._n

    @property
    def mean(self) -> torch.Tensor:
        """(1/n) sum_i mean_xy F_i, float64 [C]."""
        return self._mu.clone()

    @property
    def covariance(self) -> torch.Tensor:
        """Centred covariance (second_moment - mean mean^T, computed without cancellation), float64 [C, C]."""
        if self._n == 0:
            raise ValueError("no images accumulated")
        return self._symmetric().div_(self._n)

    @property
    def second_moment(self) -> torch.Tensor:
        """The paper's uncentred matrix (1/n) sum_i mean_xy F F^T, float64 [C, C]."""
        if self._n == 0:
            raise ValueError("no images accumulated")
        return self._symmetric().div_(self._n).addr_(self._mu, self._mu)


def _group_by_shape(features: Sequence[torch.Tensor]) -> list[tuple[list[int], torch.Tensor]]:
    """Stack images of equal size so each size is one batched update (original indices kept)."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(features):
        if f.dim() != 3:
            raise ValueError(f"image {i}: features must be [C,H,W], got shape {tuple(f.shape)}")
        by_shape.setdefault(tuple(f.shape), []).append(i)
    return [(idx, torch.stack([features[i] for i in idx])) for idx in by_shape.values()]


# --------------------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------------------

# (selector, must match something). FPN outputs are absent from classifiers, so that part is optional.
PRESETS: dict[str, tuple[tuple[str, bool], ...]] = {
    "default": (("Conv2d:*body.*", True), ("Bottleneck:*body.layer*", True), ("*fpn.layer_blocks.?", False)),
}

_NORM_NAMES = ("Norm",)


@dataclass
class Layer:
    """One analysed feature map: ``name`` is the selected module's path, ``tap`` the module hooked."""

    name: str
    tap: str
    module_type: str
    forward_index: int = -1
    feature_shape: list[int] = field(default_factory=list)


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


def select_layers(model: nn.Module, selectors: Sequence[str]) -> list[Layer]:
    """Layers chosen by the selectors (preset, ``GLOB`` or ``Type:GLOB``), in module-registration order."""
    if not selectors:
        raise EigpipeError("covariance.layers: no layer selectors given")
    modules = [(path, m) for path, m in model.named_modules() if path]
    chosen: dict[str, nn.Module] = {}
    for sel, required in _expand(selectors):
        hits = [(path, m) for path, m in modules if _matches(sel, path, m)]
        if not hits and required:
            raise EigpipeError(f"covariance.layers: selector {sel!r} matches no module of the model")
        chosen.update(hits)
    order = {path: i for i, (path, _) in enumerate(modules)}
    return [
        Layer(name=path, tap=_tap_path(model, path, m), module_type=type(m).__name__)
        for path, m in sorted(chosen.items(), key=lambda kv: order[kv[0]])
    ]


def _is_norm_or_activation(module: nn.Module) -> bool:
    if type(module).__module__ == "torch.nn.modules.activation":
        return True
    return any(part in name for name in _class_names(module) for part in _NORM_NAMES)


def _tap_path(model: nn.Module, path: str, module: nn.Module) -> str:
    """The module whose output is the post-activation feature of ``path`` (the conv itself if none)."""
    if not isinstance(module, nn.Conv2d):
        return path
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    taps = getattr(parent, "feature_taps", None)
    if isinstance(taps, dict) and attr in taps:
        tap = f"{parent_path}.{taps[attr]}" if parent_path else taps[attr]
        try:
            model.get_submodule(tap)
        except AttributeError:
            raise EigpipeError(f"layer {path}: its feature tap {tap} is not a module of the model") from None
        return tap
    if isinstance(parent, nn.Sequential):
        names = list(parent._modules)
        tap_attr = attr
        for following in names[names.index(attr) + 1 :]:
            if not _is_norm_or_activation(parent._modules[following]):
                break
            tap_attr = following
        return f"{parent_path}.{tap_attr}" if parent_path else tap_attr
    return path


# --------------------------------------------------------------------------------------------------
# Running the model on images
# --------------------------------------------------------------------------------------------------


def input_transform(model: nn.Module, meta: dict) -> nn.Module:
    """How every model sees the images: the detector's own transform, or the same one for classifiers."""
    if meta.get("task") == "detection":
        transform = getattr(model, "transform", None)
        if transform is None:
            raise EigpipeError(f"checkpoint of run {meta.get('run')}: detector has no transform module")
        return transform
    from eigpipe.models import build_transform

    return build_transform(meta.get("model_config") or {})


def backbone_runner(model: nn.Module, meta: dict, layers: Sequence[Layer]) -> Callable[[torch.Tensor, Any], Any]:
    """The smallest part of the model that runs every selected layer: fn(batched tensor, ImageList)."""
    names = [layer.tap for layer in layers] + [layer.name for layer in layers]
    if meta.get("task") != "detection":
        body = getattr(model, "body", None)
        if body is not None and all(n.startswith("body.") for n in names):
            return lambda x, _images: body(x)
        return lambda x, _images: model(x)
    if all(n.startswith("backbone.body.") for n in names):
        return lambda x, _images: model.backbone.body(x)
    if all(n.startswith("backbone.") for n in names):
        return lambda x, _images: model.backbone(x)

    def full(x: torch.Tensor, images: Any) -> Any:  # GeneralizedRCNN.forward in eval mode, transform done
        features = model.backbone(x)
        proposals, _ = model.rpn(images, features)
        detections, _ = model.roi_heads(features, proposals, images.image_sizes)
        return detections

    return full


class Extractor:
    """Hooks the selected layers of a model and folds every batch's features into accumulators.

    Use as a context manager (hooks are removed on exit); call ``run(images, image_ids)`` per batch.
    """

    def __init__(self, model: nn.Module, meta: dict, layers: Sequence[Layer], device: torch.device | str) -> None:
        self.model = model
        self.layers = list(layers)
        self.device = torch.device(device)
        self.transform = input_transform(model, meta).to(self.device).eval()
        self.forward = backbone_runner(model, meta, self.layers)
        self.accumulators: dict[str, CovarianceAccumulator] = {}
        self.workspace = Workspace()
        self._by_tap: dict[str, list[Layer]] = {}
        for layer in self.layers:
            self._by_tap.setdefault(layer.tap, []).append(layer)
        self._handles: list[Any] = []
        self._fired: dict[str, int] = {}
        self._order: list[str] = []
        self._batch: tuple[list[tuple[int, int]], tuple[int, int], list[Any]] | None = None

    def __enter__(self) -> Extractor:
        for tap in self._by_tap:
            self._handles.append(self.model.get_submodule(tap).register_forward_hook(self._hook(tap)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def run(self, images: Sequence[torch.Tensor], image_ids: Sequence[Any]) -> None:
        """Transform, forward and accumulate one batch of [3, H, W] images in [0, 1]."""
        batched, _ = self.transform([img.to(self.device) for img in images])
        padded = (batched.tensors.shape[-2], batched.tensors.shape[-1])
        self._batch = (list(batched.image_sizes), padded, list(image_ids))
        self._fired = {}
        first = not self._order
        self.forward(batched.tensors, batched)
        self._check_fired(first)

    def _check_fired(self, first: bool) -> None:
        missing = [layer.name for layer in self.layers if layer.tap not in self._fired]
        if missing:
            raise EigpipeError(f"layer {missing[0]}: the forward pass never ran its module ({len(missing)} such)")
        if first:
            for i, name in enumerate(self._order):
                for layer in self._by_tap[name]:
                    layer.forward_index = i
            self.layers.sort(key=lambda layer: layer.forward_index)

    def _hook(self, tap: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._fired[tap] = self._fired.get(tap, 0) + 1
            if self._fired[tap] > 1:
                raise EigpipeError(
                    f"layer {self._by_tap[tap][0].name}: module {tap} runs more than once per forward pass; "
                    "its features are ambiguous (select a module that runs once)"
                )
            if len(self._order) < len(self._by_tap) and tap not in self._order:
                self._order.append(tap)
            for layer in self._by_tap[tap]:
                self._accumulate(layer, output)

        return hook

    def _accumulate(self, layer: Layer, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise EigpipeError(f"layer {layer.name}: output of {layer.tap} is a {type(output).__name__}, not a tensor")
        feats = output.unsqueeze(-1).unsqueeze(-1) if output.dim() == 2 else output
        if feats.dim() != 4:
            raise EigpipeError(f"layer {layer.name}: expected a [N, C, H, W] feature, got {tuple(output.shape)}")
        assert self._batch is not None
        sizes, padded, ids = self._batch
        per_image = feats.shape[0] == len(ids) and not layer.name.startswith("roi_heads.")
        crops = _crop_valid(feats, sizes, padded) if per_image else feats
        acc = self.accumulators.get(layer.name)
        if acc is None:
            acc = self.accumulators[layer.name] = CovarianceAccumulator(feats.shape[1], self.device, self.workspace)
            first = crops[0]
            layer.feature_shape = [int(s) for s in first.shape]
        try:
            acc.update(crops)
        except NonFiniteFeature as bad:
            where = f"image id {ids[bad.index]}" if per_image else f"the batch of image ids {list(ids)}"
            raise NumericalError(f"layer {layer.name}: non-finite feature in {where}") from None


def _crop_valid(feats: torch.Tensor, sizes: list[tuple[int, int]], padded: tuple[int, int]) -> FeatureBatch:
    """Each image's feature map without the zero padding of the batch (the whole batch if none)."""
    fh, fw = feats.shape[-2:]
    valid = [(math.ceil(h * fh / padded[0]), math.ceil(w * fw / padded[1])) for h, w in sizes]
    if all(v == (fh, fw) for v in valid):
        return feats
    return [feats[i, :, :vh, :vw] for i, (vh, vw) in enumerate(valid)]


# --------------------------------------------------------------------------------------------------
# Extraction stage
# --------------------------------------------------------------------------------------------------


def accumulate(
    model: nn.Module,
    meta: dict,
    layers: Sequence[Layer],
    batches: Iterable[tuple[Sequence[torch.Tensor], Sequence[Any]]],
    device: torch.device | str,
    progress: Any = None,
) -> tuple[list[Layer], dict[str, CovarianceAccumulator]]:
    """Run every batch of (images, image ids) through the model; layers come back in forward order."""
    model.eval()
    with torch.inference_mode(), Extractor(model, meta, layers, device) as extractor:
        for images, ids in batches:
            extractor.run(images, ids)
            if progress is not None:
                progress.update(len(images))
    return extractor.layers, extractor.accumulators


def _batches(dataset: Any, indices: Sequence[int], batch_size: int) -> Iterator[tuple[list, list]]:
    for start in range(0, len(indices), batch_size):
        items = [dataset[i] for i in indices[start : start + batch_size]]
        yield [img for img, _ in items], [_image_id(target) for _, target in items]


def _image_id(target: dict) -> int:
    value = target["image_id"]
    return int(value.item() if isinstance(value, torch.Tensor) else value)


def gather_to_main(accumulators: dict[str, CovarianceAccumulator], names: Sequence[str], runtime: Any) -> None:
    """Under torchrun: merge every rank's partial accumulators into rank 0's (in place)."""
    import torch.distributed as dist

    states = {name: acc.state_dict() for name, acc in accumulators.items()}
    gathered: list[Any] | None = [None] * runtime.world_size if runtime.is_main else None
    dist.gather_object(states, gathered, dst=0)
    if not runtime.is_main:
        return
    assert gathered is not None
    for rank_states in gathered[1:]:
        for name in names:
            if name in rank_states:
                other = CovarianceAccumulator.from_state_dict(rank_states[name], runtime.device)
                if name in accumulators:
                    accumulators[name].merge(other)
                else:
                    accumulators[name] = other


def extract(
    checkpoint: str | Path,
    annotations: str | Path,
    images: str | Path,
    num_images: int,
    layers: Sequence[str],
    batch_size: int,
    out: str | Path,
    cfg: dict | None = None,
) -> Path | None:
    """The ``eigpipe covariance`` stage: one covariance store for one checkpoint. Returns the store path.

    Under torchrun every rank takes a strided share of the images; rank 0 merges and writes.
    """
    from tqdm import tqdm

    from eigpipe import runtime as rt_mod
    from eigpipe import store
    from eigpipe.data.coco import CocoDetection
    from eigpipe.models import load_checkpoint

    cfg = cfg or {}
    rt = rt_mod.setup(cfg.get("runtime"), seed=cfg.get("seed", 0))
    model, meta = load_checkpoint(checkpoint, rt.device)
    selected = select_layers(model, layers)
    dataset = CocoDetection(annotations, images, train=False)
    n = min(int(num_images), len(dataset))
    if n == 0:
        raise EigpipeError(f"{annotations}: no images to extract features from")
    if n < num_images and rt.is_main:
        print(f"covariance: only {n} images in {annotations} (asked for {num_images})", file=sys.stderr)
    share = list(range(rt.rank, n, rt.world_size))
    desc = f"covariance {meta.get('run')}@{meta.get('iteration')}"
    with tqdm(total=len(share), desc=desc, unit="img", file=sys.stderr, disable=not rt.is_main) as bar:
        ordered, accs = accumulate(model, meta, selected, _batches(dataset, share, batch_size), rt.device, bar)
    if rt.distributed:
        gather_to_main(accs, [layer.name for layer in ordered], rt)
        if not rt.is_main:
            return None
    attrs = store.covariance_root_attrs(
        meta,
        checkpoint,
        annotations,
        images,
        n,
        ordered,
        layers,
        cfg,
        transform=input_transform(model, meta),
        device=str(rt.device),
    )
    attrs["provenance"]["world_size"] = rt.world_size
    layer_attrs = {layer.name: store.covariance_layer_attrs(layer, accs[layer.name]) for layer in ordered}
    return store.write_covariance_store(out, {layer.name: accs[layer.name] for layer in ordered}, attrs, layer_attrs)
