"""COCO evaluation: prediction records, the 12 pycocotools numbers, and a checkpoint evaluated end to end."""

import json

import pytest
import torch
import yaml
from pycocotools import mask as mask_utils

from eigpipe import cli, matching
from eigpipe.data import synthetic
from eigpipe.data.coco import CocoDetection
from eigpipe.evaluate import STAT_NAMES, coco_stats, to_coco_results
from eigpipe.models import build_detector, save_checkpoint, standard

SMALL = {
    "image_size": 64,
    "train_images": 6,
    "val_images": 4,
    "classification": {"image_size": 32, "train_per_class": 1, "val_per_class": 1},
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    synthetic.generate({"data": {"source": "synthetic", "synthetic": SMALL}, "seed": 0}, out=root)
    return root / "detection"


def ground_truth_as_predictions(dataset, with_masks):
    """What a perfect detector would output for every val image, in torchvision's output format."""
    results = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        n = len(target["labels"])
        output = {"boxes": target["boxes"].clone(), "labels": target["labels"], "scores": torch.linspace(1, 0.5, n)}
        if with_masks:
            output["masks"] = target["masks"][:, None].float()
        results.extend(to_coco_results(output, int(target["image_id"]), dataset.category_ids))
    return results


def test_perfect_predictions_score_one(data):
    dataset = CocoDetection(data / "instances_val.json", data / "val", train=False, masks=True)
    results = ground_truth_as_predictions(dataset, with_masks=True)
    first = dataset.coco.loadAnns(dataset.coco.getAnnIds(imgIds=dataset.ids[0]))[0]
    assert results[0]["bbox"] == pytest.approx(first["bbox"]) and results[0]["category_id"] == first["category_id"]
    bbox, _ = coco_stats(dataset.coco, results, "bbox", list(dataset.ids))
    segm, _ = coco_stats(dataset.coco, results, "segm", list(dataset.ids))
    assert list(bbox) == list(STAT_NAMES)
    assert bbox["AP"] == pytest.approx(1.0) and segm["AP"] == pytest.approx(1.0)
    assert mask_utils.area(results[0]["segmentation"]) == first["area"]


def test_shifted_predictions_score_less(data):
    dataset = CocoDetection(data / "instances_val.json", data / "val", train=False)
    results = ground_truth_as_predictions(dataset, with_masks=False)
    for record in results:
        record["bbox"][0] += record["bbox"][2] * 0.3
    stats, found = coco_stats(dataset.coco, results, "bbox", list(dataset.ids))
    assert 0.0 < stats["AP"] < 0.9 and stats["AP50"] > stats["AP75"]
    # the kept per-image matching re-accumulates to COCOeval's own numbers
    assert matching.average_precision(found) == {name: stats[name] for name in ("AP", "AP50", "AP75")}
    none, empty = coco_stats(dataset.coco, [], "bbox", list(dataset.ids))
    assert none["AP"] == 0.0 and matching.average_precision(empty)["AP"] == 0.0
    assert empty.gt_count.sum() == len(dataset.coco.getAnnIds(imgIds=list(dataset.ids), iscrowd=False))


def checkpoint(tmp_path, name, dataset, model_cfg, task="detection"):
    model = build_detector(name, model_cfg, dataset.num_classes)
    meta = {
        "task": task,
        "model_name": name,
        "model_config": model_cfg,
        "widths": standard(multiplier=0.0625).to_dict(),
        "num_classes": dataset.num_classes,
        "category_ids": dataset.category_ids,
        "iteration": 3,
        "run": name,
    }
    save_checkpoint(tmp_path / f"{name}.pt", model, meta)
    return tmp_path / f"{name}.pt"


@pytest.mark.parametrize("name", ["faster_rcnn", "mask_rcnn"])
def test_evaluate_checkpoint_writes_the_metrics(tmp_path, data, name, tiny_model):
    dataset = CocoDetection(data / "instances_val.json", data / "val", train=False)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"evaluate": {"batch_size": 2}, "runtime": {"threads": 2}, "seed": 0}))
    out = tmp_path / "eval.json"
    code = cli.main(
        [
            "evaluate",
            "--config-json",
            json.dumps(yaml.safe_load(config.read_text())),
            "--checkpoint",
            str(checkpoint(tmp_path, name, dataset, tiny_model)),
            "--data",
            str(data / "instances_val.json"),
            "--image-dir",
            str(data / "val"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["bbox"]) == set(STAT_NAMES) and report["n_images"] == 4 and report["iteration"] == 3
    assert ("segm" in report) == (name == "mask_rcnn")
    meta, found = matching.read(tmp_path / "eval.matches.npz")  # beside --out by default
    assert meta["run"] == name and sorted(found) == sorted(k for k in ("bbox", "segm") if k in report)
    for iou_type, matches in found.items():
        assert matching.average_precision(matches)["AP"] == report[iou_type]["AP"]
    assert report["complexity"]["body_params"] > 0 and report["complexity"]["input_size"] == [64, 64]
    assert torch.__version__.startswith(report["provenance"]["versions"]["torch"])


def test_category_mismatch_is_refused(tmp_path, data, capsys, tiny_model):
    dataset = CocoDetection(data / "instances_val.json", data / "val", train=False)
    ckpt = checkpoint(tmp_path, "faster_rcnn", dataset, tiny_model)
    raw = torch.load(ckpt, weights_only=True)
    raw["category_ids"] = [1, 2, 7]
    torch.save(raw, ckpt)
    split = ["--data", str(data / "instances_val.json"), "--image-dir", str(data / "val")]
    out = ["--out", str(tmp_path / "e.json")]
    code = cli.main(["evaluate", "--config-json", "{}", "--checkpoint", str(ckpt), *split, *out])
    assert code == 1 and "differ from the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
