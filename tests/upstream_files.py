"""Files in the upstream formats, with random values, for the tensors listed in tests/upstream_keys.py.

Formats: detectron2's model zoo ``.pkl`` (a pickle of ``{"model": {name: ndarray}, "__author__": ...}``),
Detectron's Caffe2 ``.pkl`` (a pickle of ``{name: ndarray}``), mmdetection's ``.pth``
(``torch.save({"state_dict": ..., "meta": ...})``). Values keep activations of a deep stack in range: convs and
fcs He-scaled, norm scales near 1, small biases.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from tests.upstream_keys import Entry


def random_arrays(entries: list[Entry], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, shape, _target, _how in entries:
        if len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
        elif key.endswith(("weight", "_s")):  # a norm's scale
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        arrays[key] = value.astype(np.float32)
    return arrays


def write_detectron2(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as f:
        pickle.dump({"model": arrays, "__author__": "Detectron2 Model Zoo"}, f)
    return path


def write_caffe2(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    with open(path, "wb") as f:
        pickle.dump(arrays, f)
    return path


def write_mmdet(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    state = OrderedDict((k, torch.from_numpy(v)) for k, v in arrays.items())
    torch.save({"state_dict": state, "meta": {"mmdet_version": "2.0.0", "epoch": 73}}, path)
    return path
