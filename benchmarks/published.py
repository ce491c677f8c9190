"""Published checkpoints at full scale, with a random-weight model of the same architecture (no published file
is fetched): the time per image of covariance extraction at 800 px, and the widths derivation of the imported
full-width model checked at 800 px.

    .venv/bin/python benchmarks/published.py            # about 10-20 min on 2 shared cores
    .venv/bin/python benchmarks/published.py --quick    # a smoke run of the script itself (small images)

1. A detectron2 model-zoo file of `scratch_mask_rcnn_R_50_FPN_9x_gn`'s architecture with random weights
   (tests/upstream_keys.py, tests/upstream_files.py) is imported with `eigpipe import --preset ...`.
2. `eigpipe covariance` (the stage, in this process) on 640x480 synthetic images, which the model's transform
   resizes to 800x1066 as it does COCO's: once on one image and once on N; the time per image is the difference
   over N - 1 (model loading and store writing cancel out), wall and process CPU time.
3. spectrum -> dimensions -> `eigpipe widths` with widths.input_size [800, 800]; the derived spec's detector is
   built and measured (params, and MACs with torch's flop counter at 800x800) against the derivation record.
Writes benchmarks/results/published.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "published.json"
PRESET = "detectron2/scratch_mask_rcnn_R_50_FPN_9x_gn"


def _sections(**given: dict) -> dict[str, Any]:
    from eigpipe import config

    return {
        "seed": 0,
        **{
            name: config.validate(dict(v), "benchmark", config.schema()["properties"][name])
            for name, v in given.items()
        },
    }


def _extract(checkpoint: Path, val: tuple[Path, Path], images: int, out: Path, threads: int) -> tuple[float, float]:
    from eigpipe.spectral.extract import extract

    cfg = _sections(
        covariance={"images": images, "batch_size": 1, "layers": ["default"]},
        runtime={"device": "cpu", "threads": threads, "deterministic": True},
    )
    wall, cpu = time.perf_counter(), time.process_time()
    extract(cfg, checkpoint, val[0], val[1], out)
    return time.perf_counter() - wall, time.process_time() - cpu


def _derivation(checkpoint: Path, store: Path, root: Path, size: int) -> dict[str, Any]:
    from eigpipe.complexity import count_macs, count_params
    from eigpipe.models import build_detector, load_checkpoint
    from eigpipe.models.widths import WidthSpec
    from eigpipe.spectral.dimensions import dimensions
    from eigpipe.spectral.spectrum import decompose
    from eigpipe.spectral.widths import derive

    table = root / "spectrum.parquet"
    decompose(_sections(spectrum={}), store, table, root / "eigenvalues.zarr")
    dims = root / "dimensions.parquet"
    dimensions({}, [table], dims)
    spec_path = root / "derived.yaml"
    record = derive(
        _sections(widths={"multiple": 8, "min_width": 16, "input_size": [size, size]}), dims, checkpoint, spec_path
    )
    _, meta = load_checkpoint(checkpoint)
    derived = build_detector(meta["model_name"], meta["model_config"], meta["num_classes"], WidthSpec.load(spec_path))
    image = torch.zeros(1, 3, size, size)
    measured = {
        "body_params": count_params(derived.backbone.body),
        "body_macs": count_macs(derived.backbone.body.eval(), image),
        "detector_params": count_params(derived),
    }
    recorded = {
        "body_params": record["body"]["derived"]["params"],
        "body_macs": record["body"]["derived"]["macs"],
        "detector_params": record["detector"]["derived"]["params"],
    }
    return {
        "input_size": [size, size],
        "measured": measured,
        "recorded": recorded,
        "equal": measured == recorded,
        "body_ratio": record["body"]["ratio"],
        "alpha": record["alpha"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small images, 2 images: checks the script only")
    parser.add_argument("--images", type=int, default=4, help="images of the timed extraction (default 4)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from eigpipe.models.published.stage import import_checkpoint
    from eigpipe.provenance import cpu_model, versions, write_json
    from tests import upstream_keys
    from tests.test_published_study import coco_split
    from tests.upstream_files import random_arrays, write_detectron2

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # other processes on the machine: the wall times below share its cores
    size, image, images = (64, (80, 64), 2) if args.quick else (800, (640, 480), args.images)
    with tempfile.TemporaryDirectory(prefix="eigpipe-published-") as tmp:
        root = Path(tmp)
        weights = write_detectron2(root / "model_final.pkl", random_arrays(upstream_keys.detectron2_mask_rcnn_gn()))
        checkpoint = root / "imported.pt"
        model_json = '{"min_size": 64, "max_size": 64}' if args.quick else None
        start = time.perf_counter()
        import_checkpoint({}, weights, checkpoint, preset=PRESET, model_json=model_json)
        import_seconds = time.perf_counter() - start
        val = coco_split(root, "val", images, seed=0, size=image)
        one = _extract(checkpoint, val, 1, root / "one.zarr", args.threads)
        many = _extract(checkpoint, val, images, root / "many.zarr", args.threads)
        per_image = {"wall_s": (many[0] - one[0]) / (images - 1), "cpu_s": (many[1] - one[1]) / (images - 1)}
        derivation = _derivation(checkpoint, root / "many.zarr", root, size)
    report = {
        "preset": PRESET,
        "weights": "random, the preset's architecture (tests/upstream_keys.py)",
        "image": {
            "file_size": list(image),
            "resized_to": "800x1066 (min_size 800, max_size 1333)" if not args.quick else "64",
        },
        "images": images,
        "threads": args.threads,
        "import_s": import_seconds,
        "extraction_per_image": per_image,
        "extraction_runs": {
            "one_image": {"wall_s": one[0], "cpu_s": one[1]},
            "n_images": {"wall_s": many[0], "cpu_s": many[1]},
        },
        "derivation": derivation,
        "quick": args.quick,
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "load_average_1min": [load_before, os.getloadavg()[0]],
        },
        "versions": versions(),
        "command": "benchmarks/published.py" + (" --quick" if args.quick else ""),
    }
    print(yaml.safe_dump(report, sort_keys=False))
    if not args.quick:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
