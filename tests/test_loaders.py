"""Parallel data loading in extraction and evaluation: the results do not depend on the worker count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from eigpipe import cli
from eigpipe.data.coco import CocoDetection
from eigpipe.spectral import extract, store
from tests.helpers import covariance_args, detector_checkpoint


def test_extraction_loader_keeps_order_strided_shares_and_lists(on_disk: dict) -> None:
    dataset = CocoDetection(on_disk["annotations"], on_disk["images"], train=False)
    batches = list(extract._batches(dataset, range(1, 5, 2), batch_size=1, workers=0, pin_memory=False))
    assert [ids for _, ids in batches] == [[dataset.ids[1]], [dataset.ids[3]]]
    images, ids = next(iter(extract._batches(dataset, range(5), batch_size=3, workers=0, pin_memory=False)))
    assert isinstance(images, list) and len(images) == 3 and ids == dataset.ids[:3]


def test_stores_are_bitwise_equal_with_0_and_2_workers(on_disk: dict, tmp_path: Path) -> None:
    arrays = ("second_moment", "mean")
    found = []
    for workers in (0, 2):
        cfg = json.dumps(
            {"covariance": {"images": 5, "batch_size": 2, "workers": workers}, "runtime": {"threads": 1}, "seed": 0}
        )
        out = tmp_path / f"{workers}.zarr"
        assert cli.main(covariance_args(on_disk, "faster_rcnn-scratch", cfg, out)) == 0
        found.append(store.read_store(out, store.COVARIANCE_KIND, arrays))
    (attrs_0, layers_0), (attrs_2, layers_2) = found
    assert attrs_0["layers"] == attrs_2["layers"] and layers_0.keys() == layers_2.keys()
    for name, (values, layer_attrs) in layers_0.items():
        assert layer_attrs == layers_2[name][1]
        for key in arrays:
            assert np.array_equal(values[key], layers_2[name][0][key]), (name, key)


def test_evaluation_is_equal_with_0_and_2_workers(tmp_path: Path, data: Path, tiny_model: dict) -> None:
    dataset = CocoDetection(data / "instances_val.json", data / "val", train=False)
    ckpt = detector_checkpoint(tmp_path, "faster_rcnn", dataset, tiny_model)
    reports = []
    for workers in (0, 2):
        cfg = json.dumps({"evaluate": {"batch_size": 3, "workers": workers}, "runtime": {"threads": 1}})
        out = tmp_path / f"eval-{workers}.json"
        split = ["--data", str(data / "instances_val.json"), "--image-dir", str(data / "val")]
        assert cli.main(["evaluate", "--config-json", cfg, "--checkpoint", str(ckpt), *split, "--out", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["n_detections"] > 0
    for key in ("bbox", "n_detections", "n_images", "complexity"):
        assert reports[0][key] == reports[1][key], key


def test_predict_records_are_equal_with_0_and_2_workers(tmp_path: Path, data: Path, tiny_model: dict) -> None:
    from eigpipe.evaluate import predict
    from eigpipe.models import load_checkpoint

    dataset = CocoDetection(data / "instances_val.json", data / "val", train=False)
    model, meta = load_checkpoint(detector_checkpoint(tmp_path, "faster_rcnn", dataset, tiny_model), "cpu")
    torch.set_num_threads(1)
    model.eval()
    runs = [predict(model, dataset, meta["category_ids"], torch.device("cpu"), 2, workers) for workers in (0, 2)]
    assert runs[0] and runs[0] == runs[1]
