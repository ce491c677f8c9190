"""COCO evaluation: prediction records, the 12 pycocotools numbers, and a checkpoint evaluated end to end."""

import json

import pytest
import torch
import yaml
from pycocotools import mask as mask_utils

from eigpipe import cli, matching
from eigpipe.data.coco import CocoDetection
from eigpipe.evaluate import STAT_NAMES, coco_stats, to_coco_results
from tests.helpers import detector_checkpoint


def ground_truth_as_predictions(dataset, with_masks, category_ids=None):
    """What a perfect detector would output for every image of ``dataset``, in torchvision's output format."""
    results = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        n = len(target["labels"])
        output = {"boxes": target["boxes"].clone(), "labels": target["labels"], "scores": torch.linspace(1, 0.5, n)}
        if with_masks:
            output["masks"] = target["masks"][:, None].float()
        results.extend(to_coco_results(output, int(target["image_id"]), category_ids or dataset.category_ids))
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
            str(detector_checkpoint(tmp_path, name, dataset, tiny_model)),
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
    ckpt = detector_checkpoint(tmp_path, "faster_rcnn", dataset, tiny_model)
    raw = torch.load(ckpt, weights_only=True)
    raw["category_ids"] = [1, 2, 7]
    torch.save(raw, ckpt)
    split = ["--data", str(data / "instances_val.json"), "--image-dir", str(data / "val")]
    out = ["--out", str(tmp_path / "e.json")]
    code = cli.main(["evaluate", "--config-json", "{}", "--checkpoint", str(ckpt), *split, *out])
    assert code == 1 and "differ from the checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()


@pytest.fixture(scope="module")
def gapped(tmp_path_factory, data):
    """The val split with COCO-like gapped category ids (1, 2, 3 -> 5, 9, 17), images shared."""
    record = json.loads((data / "instances_val.json").read_text())
    new_id = {1: 5, 2: 9, 3: 17}
    for category in record["categories"]:
        category["id"] = new_id[category["id"]]
    for annotation in record["annotations"]:
        annotation["category_id"] = new_id[annotation["category_id"]]
    path = tmp_path_factory.mktemp("gapped") / "instances_val.json"
    path.write_text(json.dumps(record))
    return path


def test_labels_map_to_gapped_category_ids(data, gapped):
    output = {"boxes": torch.tensor([[0.0, 0, 4, 4]] * 3), "labels": torch.tensor([3, 1, 2]), "scores": torch.ones(3)}
    assert [r["category_id"] for r in to_coco_results(output, 7, [5, 9, 17])] == [17, 5, 9]
    dataset = CocoDetection(gapped, data / "val", train=False)
    assert dataset.category_ids == [5, 9, 17]
    results = ground_truth_as_predictions(dataset, with_masks=False)
    assert coco_stats(dataset.coco, results, "bbox", list(dataset.ids))[0]["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("subset", [slice(0, 2), slice(1, 4), slice(3, 4)])
def test_only_the_evaluated_images_count(data, subset):
    """Perfect predictions on some of the images score 1.0 on exactly those images (the others are not misses)."""
    dataset = CocoDetection(data / "instances_val.json", data / "val", train=False)
    ids = list(dataset.ids)[subset]
    results = [r for r in ground_truth_as_predictions(dataset, with_masks=False) if r["image_id"] in ids]
    assert coco_stats(dataset.coco, results, "bbox", ids)[0]["AP"] == pytest.approx(1.0)
    assert coco_stats(dataset.coco, results, "bbox", list(dataset.ids))[0]["AP"] < 1.0  # all images: the rest missed


@pytest.mark.parametrize("max_images", [1, 3])
def test_max_images_evaluates_the_images_it_predicts(tmp_path, data, gapped, tiny_model, monkeypatch, max_images):
    """The stage's predictions and the image ids it scores are the same subset (a perfect stand-in model)."""
    import eigpipe.evaluate as evaluate

    def perfect(model, subset, category_ids, *args):
        assert list(category_ids) == [5, 9, 17]
        return ground_truth_as_predictions(subset, with_masks=False, category_ids=category_ids)

    monkeypatch.setattr(evaluate, "predict", perfect)
    dataset = CocoDetection(gapped, data / "val", train=False)
    runtime = {"device": "cpu", "threads": 1, "deterministic": True, "tf32": False}
    cfg = {"evaluate": {"batch_size": 2, "max_images": max_images, "workers": 0}, "runtime": runtime}
    ckpt = detector_checkpoint(tmp_path, "faster_rcnn", dataset, tiny_model)
    report = evaluate.evaluate_checkpoint(cfg, ckpt, gapped, data / "val", tmp_path / "e.json")
    assert report["n_images"] == max_images and report["bbox"]["AP"] == pytest.approx(1.0)


# ---- no meaningless result with exit 0 (issue 18, item 7) --------------------------------------------------------


def evaluate_args(tmp_path, ckpt, annotations, images, **evaluate):
    cfg = json.dumps({"evaluate": {"batch_size": 2, **evaluate}, "runtime": {"threads": 1}})
    split = ["--data", str(annotations), "--image-dir", str(images)]
    return ["evaluate", "--config-json", cfg, "--checkpoint", str(ckpt), *split, "--out", str(tmp_path / "e.json")]


def _all_crowd(split: dict) -> None:
    for ann in split["annotations"]:
        ann["iscrowd"] = 1


def _first_image_crowd(split: dict) -> None:
    first = min(image["id"] for image in split["images"])
    for ann in split["annotations"]:
        ann["iscrowd"] = int(ann["image_id"] == first)


SPLITS = {
    "only crowd annotations": (_all_crowd, {}, "AP is undefined"),
    "no annotations": (lambda split: split.__setitem__("annotations", []), {}, "AP is undefined"),
    "no images": (lambda split: split.update(images=[], annotations=[]), {}, "no images to evaluate"),
    "the evaluated image only crowd": (_first_image_crowd, {"max_images": 1}, "the 1 evaluated images"),
}


@pytest.mark.parametrize("split", SPLITS)
def test_a_split_without_ground_truth_that_counts_is_refused(tmp_path, data, capsys, tiny_model, split):
    dataset = CocoDetection(data / "instances_val.json", data / "val", train=False)
    ckpt = detector_checkpoint(tmp_path, "faster_rcnn", dataset, tiny_model)
    change, evaluate, words = SPLITS[split]
    records = json.loads((data / "instances_val.json").read_text())
    change(records)
    annotations = tmp_path / "split.json"
    annotations.write_text(json.dumps(records))
    assert cli.main(evaluate_args(tmp_path, ckpt, annotations, data / "val", **evaluate)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(annotations) in err and words in err, err
    assert not (tmp_path / "e.json").exists()


def _fill(key: str, value: float):  # noqa: ANN202
    return lambda state: state[key].fill_(value)


BROKEN_WEIGHTS = {  # (change to the state dict, the words of the one line)
    "NaN box predictor": (_fill("roi_heads.box_predictor.cls_score.weight", float("nan")), "non-finite values"),
    "Inf RPN bias": (_fill("rpn.head.cls_logits.bias", float("inf")), "non-finite values"),
    # finite weights whose outputs overflow: torchvision would drop the non-finite boxes and report AP 0
    "overflowing stem": (_fill("backbone.body.conv1.weight", 1e38), "image id 0: the backbone computes non-finite"),
    "overflowing RPN": (_fill("rpn.head.conv.0.0.weight", 1e38), "image id 0: the RPN head computes non-finite"),
    "overflowing box head": (
        _fill("roi_heads.box_predictor.cls_score.weight", 3e38),
        "image ids [0, 1]: the box predictor computes non-finite",
    ),
}


@pytest.mark.parametrize("broken", BROKEN_WEIGHTS)
def test_non_finite_weights_or_outputs_are_refused_naming_tensor_or_image(tmp_path, data, capsys, tiny_model, broken):
    dataset = CocoDetection(data / "instances_val.json", data / "val", train=False)
    ckpt = detector_checkpoint(tmp_path, "faster_rcnn", dataset, tiny_model)
    raw = torch.load(ckpt, weights_only=True)
    change, words = BROKEN_WEIGHTS[broken]
    change(raw["state_dict"])
    torch.save(raw, ckpt)
    assert cli.main(evaluate_args(tmp_path, ckpt, data / "instances_val.json", data / "val")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # the progress bar is cleared, not left
    error = err.rsplit("\r", 1)[-1]
    assert str(ckpt) in error and words in error, err
    assert not (tmp_path / "e.json").exists()
