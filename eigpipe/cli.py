"""Command line: argument parsing only. Each subcommand calls one function of the package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from eigpipe.errors import EigpipeError


def _config_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", type=Path, help="a whole study config YAML")
    group.add_argument("--config-json", help="only the sections this stage reads, as JSON (rules pass this)")


def _sections(args: argparse.Namespace, *names: str) -> dict:
    from eigpipe import config

    return config.sections(args.config, args.config_json, names)


def cmd_synth_data(args: argparse.Namespace) -> None:
    cfg = _sections(args, "data")
    from eigpipe.data import synthetic

    synthetic.generate(cfg["data"].get("synthetic", {}), seed=cfg.get("seed", 0), out=args.out)


def cmd_check_data(args: argparse.Namespace) -> None:
    from eigpipe.data import coco

    report = coco.validate(args.annotations, args.images, strict=args.strict)
    print(report.summary())


def cmd_complexity(args: argparse.Namespace) -> None:
    from eigpipe import complexity

    table = complexity.report_for_config(
        args.model_config, height=args.input_size[0], width=args.input_size[1], num_classes=args.num_classes
    )
    print(table)


def cmd_train(args: argparse.Namespace) -> None:
    from eigpipe.train import loop

    if args.task == "classification":
        cfg = _sections(args, "model", "pretrain")
        loop.train_classifier(cfg, data=args.data, out=args.out)
    else:
        cfg = _sections(args, "model", "train", "data")
        loop.train_detector(
            cfg, model_name=args.model, init=args.init, annotations=args.data, images=args.image_dir, out=args.out
        )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from eigpipe import evaluate

    cfg = _sections(args, "evaluate")
    evaluate.evaluate_checkpoint(
        args.checkpoint, annotations=args.data, images=args.image_dir, out=args.out, cfg=cfg
    )


def cmd_covariance(args: argparse.Namespace) -> None:
    from eigpipe import covariance

    cfg = _sections(args, "covariance")
    section = cfg["covariance"]
    covariance.extract(
        args.checkpoint,
        annotations=args.data,
        images=args.image_dir,
        num_images=args.images or section["images"],
        layers=args.layers or section["layers"],
        batch_size=section["batch_size"],
        out=args.out,
        cfg=cfg,
    )


def cmd_spectrum(args: argparse.Namespace) -> None:
    from eigpipe import spectrum

    cfg = _sections(args, "spectrum")
    spectrum.decompose_store(args.store, out=args.out, eigenvalues_out=args.eigenvalues, cfg=cfg["spectrum"])


def cmd_dimensions(args: argparse.Namespace) -> None:
    from eigpipe import spectrum

    spectrum.dimensions_table(args.spectra, out=args.out)


def cmd_report(args: argparse.Namespace) -> None:
    from eigpipe import report

    cfg = _sections(args, "report")
    report.make_report(
        dimensions=args.dimensions,
        eigenvalues=args.eigenvalues,
        evaluations=args.evaluations,
        out_dir=args.out_dir,
        cfg=cfg["report"],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eigpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth-data", help="generate the synthetic detection + classification dataset")
    _config_args(p)
    p.add_argument("--out", type=Path, required=True, help="dataset folder to create")
    p.set_defaults(func=cmd_synth_data)

    p = sub.add_parser("check-data", help="validate a COCO-format dataset before a long run")
    p.add_argument("--annotations", "--data", type=Path, required=True, help="COCO instances JSON")
    p.add_argument("--images", "--image-dir", type=Path, required=True, help="folder of the images")
    p.add_argument("--strict", action="store_true", help="imperfect boxes are errors, not dropped/clipped")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("complexity", help="params and MACs of backbone, FPN and detector")
    p.add_argument("--model-config", type=Path, required=True, help="study config or a bare model section")
    p.add_argument("--input-size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"))
    p.add_argument("--num-classes", type=int, default=91, help="detector classes including background")
    p.set_defaults(func=cmd_complexity)

    p = sub.add_parser("train", help="classification pre-training or detector training")
    _config_args(p)
    p.add_argument("--task", choices=["classification", "detection"], default="detection")
    p.add_argument("--model", choices=["faster_rcnn", "mask_rcnn"], default="faster_rcnn")
    p.add_argument("--init", default="scratch", help="scratch | pretrained:<checkpoint or torchvision weights>")
    p.add_argument("--data", type=Path, required=True, help="instances JSON (detection) or image-folder root")
    p.add_argument("--image-dir", type=Path, help="images of the instances JSON (detection)")
    p.add_argument("--out", type=Path, required=True, help="run folder (final.pt, snapshots/, metrics.jsonl)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="COCO bbox (and segm) AP of a checkpoint on a split")
    _config_args(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="instances JSON of the split")
    p.add_argument("--image-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="metrics JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("covariance", help="feature covariance of every selected layer into a zarr store")
    _config_args(p)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="instances JSON whose images are fed")
    p.add_argument("--image-dir", type=Path, required=True)
    p.add_argument("--images", type=int, help="number of images (default: the config's)")
    p.add_argument("--layers", nargs="+", help="selectors: preset 'default', GLOB or Type:GLOB")
    p.add_argument("--out", type=Path, required=True, help="STORE.zarr")
    p.set_defaults(func=cmd_covariance)

    p = sub.add_parser("spectrum", help="eigenvalues and dimension measures of a covariance store")
    _config_args(p)
    p.add_argument("store", type=Path)
    p.add_argument("--out", type=Path, required=True, help="table (.parquet or .csv)")
    p.add_argument("--eigenvalues", type=Path, help="eigenvalue zarr (default: beside --out)")
    p.set_defaults(func=cmd_spectrum)

    p = sub.add_parser("dimensions", help="one table of all snapshots of a run")
    p.add_argument("--spectra", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_dimensions)

    p = sub.add_parser("report", help="plots and tables of a study")
    _config_args(p)
    p.add_argument("--dimensions", type=Path, nargs="+", required=True)
    p.add_argument("--eigenvalues", type=Path, nargs="+", default=[], help="eigenvalue zarrs (final models)")
    p.add_argument("--evaluations", type=Path, nargs="*", default=[])
    p.add_argument("--out-dir", type=Path, required=True)
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except EigpipeError as exc:
        print(f"eigpipe {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"eigpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
