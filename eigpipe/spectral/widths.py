"""The ``eigpipe widths`` stage: a widths spec YAML derived from a run's dimensions table, with its record."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import yaml

from eigpipe.errors import EigpipeError
from eigpipe.models.widths import WidthSpec
from eigpipe.outputs import Kind, claim_outputs
from eigpipe.spectral.derivation import MEASURES, derive_widths
from eigpipe.spectral.dimensions import read_table


def _is_derived_spec(path: Path) -> bool:
    data = yaml.safe_load(path.read_text())
    return isinstance(data, dict) and isinstance(data.get("derivation"), dict) and "source" in data["derivation"]


WIDTHS_SPEC = Kind("a widths spec derived by eigpipe widths", _is_derived_spec)


def _detector(meta: dict, spec: WidthSpec, size: tuple[int, int]) -> dict[str, int]:
    from eigpipe.complexity import model_complexity
    from eigpipe.models import build_detector

    model = build_detector(meta["model_name"], meta["model_config"], meta["num_classes"], widths=spec)
    found = model_complexity(model, *size)
    return {
        "params": found["detector_params"],
        "macs": found["detector_macs"],
        "body_params": found["body_params"],
        "body_macs": found["body_macs"],
    }


def _warn_fewer_groups(model_cfg: dict, layers: list[dict]) -> None:
    """One warning line when derived widths give a GroupNorm fewer groups than the original width had (the model
    uses gcd(width, gn_groups) groups): normalisation changes along with the width."""
    if model_cfg["norm"] != "gn":
        return
    groups = model_cfg["gn_groups"]
    both = [layer for layer in layers if layer["original"] and layer["derived"]]  # a downsample may be in one only
    fewer = [layer for layer in both if math.gcd(layer["derived"], groups) < math.gcd(layer["original"], groups)]
    if fewer:
        first = fewer[0]
        print(
            f"warning: widths: {len(fewer)} convs get widths that give their GroupNorm fewer than model.gn_groups "
            f"{groups} groups (e.g. {first['name']}: {first['derived']}); a widths.multiple of {groups} keeps them",
            file=sys.stderr,
        )


def derive(cfg: dict, dimensions: Path, checkpoint: Path, out: Path) -> dict:
    """The `eigpipe widths` stage: write a widths spec YAML with its `derivation` record; return the record."""
    from eigpipe import provenance
    from eigpipe.models.checkpoint import checkpoint_parts

    section = cfg["widths"]
    dimensions, checkpoint, out = Path(dimensions), Path(checkpoint), Path(out)
    claim_outputs((out, WIDTHS_SPEC), inputs=[dimensions, checkpoint])
    measure = [section["measure"]] if section["measure"] in MEASURES else []  # an unknown one: derive_widths says
    table = read_table(dimensions, ("run", "iteration", "layer", *measure))
    available = sorted(int(i) for i in table["iteration"].unique())
    iteration = available[-1] if section["source_iteration"] is None else int(section["source_iteration"])
    if iteration not in available:
        raise EigpipeError(f"{dimensions}: no iteration {iteration} (the table has {', '.join(map(str, available))})")
    table = table[table["iteration"] == iteration]
    meta, _state = checkpoint_parts(checkpoint, task="detection")  # the source run's detector (its final.pt)
    original = WidthSpec.from_dict(meta["widths"], source=f"{checkpoint}: widths")
    runs = sorted({str(r) for r in table["run"]}) if "run" in table.columns else []
    if meta.get("run") is not None and runs and runs != [str(meta["run"])]:
        print(f"warning: widths: table run {', '.join(runs)} is not checkpoint run {meta['run']}", file=sys.stderr)
    size = tuple(section["input_size"] or (meta["model_config"]["min_size"],) * 2)
    try:
        result = derive_widths(
            table,
            original,
            measure=section["measure"],
            multiple=section["multiple"],
            min_width=section["min_width"],
            macs_budget=section["macs_budget"],
            input_size=size,
            aggregate=section["aggregate"],
            tied_from=section["tied_from"],
            fill=section["fill"],
            min_ratio=section["min_ratio"],
        )
    except EigpipeError as exc:  # name the file the table came from
        raise type(exc)(f"{dimensions}: {exc}") from None
    _warn_fewer_groups(meta["model_config"], result.layers)
    detector = {"original": _detector(meta, original, size), "derived": _detector(meta, result.widths, size)}
    detector["ratio"] = {k: detector["derived"][k] / detector["original"][k] for k in ("params", "macs")}
    record = {
        "source": {
            "run": runs[0] if runs else meta.get("run"),
            "iteration": iteration,
            "model_name": meta["model_name"],
            "dimensions": str(dimensions),
            "dimensions_sha256": provenance.sha256_file(dimensions),
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": provenance.sha256_file(checkpoint),
        },
        "measure": section["measure"],
        "alpha": result.alpha,
        "macs_budget": section["macs_budget"],
        "budget_macs": int(section["macs_budget"] * result.body["original"]["macs"]),
        "floor": result.floor,
        "multiple": section["multiple"],
        "min_width": section["min_width"],
        "min_ratio": section["min_ratio"],
        "aggregate": section["aggregate"],
        "tied_from": section["tied_from"],
        "fill": section["fill"],
        "input_size": list(size),
        "body": result.body,
        "detector": detector,
        "original_widths": original.to_dict(),
        "layers": result.layers,
        "provenance": provenance.record(config=section, inputs=[dimensions, checkpoint]),
    }
    text = yaml.safe_dump({**result.widths.to_dict(), "derivation": record}, default_flow_style=None, sort_keys=False)
    with provenance.publish(out) as tmp:
        tmp.write_text(text)
        if WidthSpec.load(tmp) != result.widths:
            raise EigpipeError(f"{out}: the written widths spec does not read back as derived")
    body = result.body["ratio"]
    print(
        f"widths: {record['source']['run']} @ {iteration} by {section['measure']}: alpha {result.alpha:.4g}, "
        f"body params x{body['params']:.3f}, body MACs x{body['macs']:.3f} -> {out}",
        file=sys.stderr,
    )
    return record
