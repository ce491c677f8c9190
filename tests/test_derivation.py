"""Width derivation from a dimensions table: analytic cost, budgeted bisection, tied widths, errors, the stage."""

import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from eigpipe import config
from eigpipe.complexity import count_macs, count_params, model_complexity
from eigpipe.errors import ConfigError, EigpipeError
from eigpipe.models import WidthSpec, build_body, build_detector, save_checkpoint, standard
from eigpipe.models.cost import body_cost, convs
from eigpipe.models.widths import Stage
from eigpipe.spectral.derivation import MEASURES, derive_widths, widths_at
from eigpipe.spectral.widths import derive


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convs run fastest on one thread, above all on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_cfg(**partial):
    return config.validate(dict(partial), "test", config.schema()["properties"]["model"])


def widths_cfg(**partial):
    return {"widths": config.validate(dict(partial), "test", config.schema()["properties"]["widths"])}


def layer_names(spec):
    """(canonical, channels, module type) of every row a dimensions table has for the body, in forward order."""
    rows = [("conv1", spec.stem, "Conv2d")]
    cin = spec.stem
    for i, stage in enumerate(spec.stages, start=1):
        for j, (w1, w2) in enumerate(stage.blocks):
            name = f"layer{i}.{j}"
            if (j == 0 and i > 1) or cin != stage.out:
                rows.append((f"{name}.downsample.0", stage.out, "Conv2d"))
            rows += [
                (f"{name}.conv1", w1, "Conv2d"),
                (f"{name}.conv2", w2, "Conv2d"),
                (f"{name}.conv3", stage.out, "Conv2d"),
                (name, stage.out, "Bottleneck"),
            ]
            cin = stage.out
    return rows


def make_table(spec, d=None, run="faster_rcnn-scratch", iteration=0, seed=0):
    """A dimensions table of one snapshot; ``d(name, channels)`` gives the measure (default 40-90% of channels)."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, channels, kind in layer_names(spec):
        value = d(name, channels) if d else float(rng.integers(max(1, int(0.4 * channels)), int(0.9 * channels) + 1))
        row = {
            "run": run,
            "iteration": iteration,
            "layer": "backbone.body." + name,
            "canonical": name,
            "module_type": kind,
            "channels": channels,
        }
        row.update({m: float(value) for m in MEASURES})
        rows.append(row)
    return pd.DataFrame(rows)


def small_spec():
    return WidthSpec(
        stem=12,
        stages=(Stage(12, ((4, 8),)), Stage(20, ((8, 4), (12, 4))), Stage(16, ((4, 4),)), Stage(8, ((8, 8), (4, 12)))),
    )


# -- analytic cost ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [standard((3, 4, 6, 3), 1.0), standard((1, 2, 1, 1), 0.25), small_spec()],
    ids=["r50", "quarter", "irregular"],
)
def test_body_cost_equals_measured(spec):
    body = build_body(model_cfg(norm="bn"), spec).eval()  # norm affine params are 2 per channel for bn and gn
    sizes = [(224, 224), (33, 57)] if spec.stem == 64 else [(64, 64), (33, 57), (17, 16), (97, 31)]
    for h, w in sizes:
        assert body_cost(spec, h, w) == (count_params(body), count_macs(body, torch.zeros(1, 3, h, w))), (h, w)
    if spec.stem == 64:
        params, macs = body_cost(spec, 224, 224)
        assert params == 23_508_032 and round(macs / 1e9, 2) == 4.09


# -- property-based -----------------------------------------------------------------------------------------


@st.composite
def problems(draw):
    width = st.integers(4, 64)
    stages = tuple(
        Stage(draw(width), tuple((draw(width), draw(width)) for _ in range(draw(st.integers(1, 3))))) for _ in range(4)
    )
    spec = WidthSpec(stem=draw(width), stages=stages)
    seed = draw(st.integers(0, 2**31))
    zero_share = draw(st.sampled_from([0.0, 0.0, 0.2]))
    rng = np.random.default_rng(seed)

    def d(name, channels):
        return 0.0 if rng.random() < zero_share else float(rng.uniform(0, 1.5) * channels)

    knobs = {
        "multiple": draw(st.sampled_from([1, 2, 4, 8])),
        "min_width": draw(st.integers(1, 12)),
        "min_ratio": draw(st.sampled_from([0.0, 0.0, 0.25, 0.5, 0.75])),
        "aggregate": draw(st.sampled_from(["max", "mean", "median"])),
        "tied_from": draw(st.sampled_from(["block_output", "conv3"])),
        "input_size": (draw(st.integers(32, 96)), draw(st.integers(32, 96))),
    }
    return spec, make_table(spec, d), knobs, draw(st.floats(0.2, 2.0)), draw(st.floats(1.0, 1.5))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_budget_multiple_floor_ties_and_monotone_alpha(problem):
    spec, table, knobs, budget, growth = problem
    try:
        low = derive_widths(table, spec, macs_budget=budget, **knobs)
    except EigpipeError as exc:
        assert "cannot be met" in str(exc)
        event("budget out of reach")
        return
    original = body_cost(spec, *knobs["input_size"])[1]
    tie_knobs = {k: v for k, v in knobs.items() if k != "input_size"}
    high = derive_widths(table, spec, macs_budget=budget * growth, **knobs)
    unfilled = derive_widths(table, spec, macs_budget=budget, fill=False, **knobs)
    # the fill only widens (MACs need not grow: a stage output equal to its input drops layer1's downsample conv)
    assert unfilled.alpha == low.alpha
    assert all(f >= u for f, u in zip(flat_widths(low.widths), flat_widths(unfilled.widths), strict=True))
    check_filled(low, budget * original, knobs)
    for result, b in ((unfilled, budget), (high, budget * growth)):
        params, macs = body_cost(result.widths, *knobs["input_size"])
        assert macs <= b * original
        assert result.body["derived"] == {"params": params, "macs": macs}
        assert all(w % knobs["multiple"] == 0 and w >= knobs["min_width"] for w in flat_widths(result.widths))
        for layer in result.layers:  # min_ratio: no conv narrower than that share of its original width
            if layer["derived"] is not None and layer["original"] is not None:
                assert layer["derived"] >= layer["floor"] >= knobs["min_ratio"] * layer["original"]
        if any(layer["d"] > 0 for layer in result.layers):  # the next larger alpha breaks the budget
            above = widths_at(table, spec, math.nextafter(result.alpha, math.inf), **tie_knobs)
            assert body_cost(above, *knobs["input_size"])[1] > b * original
    assert widths_at(table, spec, unfilled.alpha, **tie_knobs) == unfilled.widths  # without fill: alpha * d rounded
    assert high.alpha >= low.alpha and high.body["derived"]["macs"] >= low.body["derived"]["macs"]
    body = build_body(model_cfg(norm="bn"), low.widths)  # the built model honours the residual ties
    for i, stage in enumerate(low.widths.stages, start=1):
        for block in getattr(body, f"layer{i}"):
            assert block.conv3.out_channels == stage.out
            if block.downsample is not None:
                assert block.downsample[0].out_channels == stage.out
    by_name = {layer["name"]: layer for layer in low.layers}
    for i, stage in enumerate(low.widths.stages, start=1):
        assert {by_name[f"layer{i}.{j}.conv3"]["derived"] for j in range(len(stage.blocks))} == {stage.out}


def flat_widths(spec):
    """Every independent width of a spec: stem, stage outs, then each block's conv1 and conv2."""
    return [spec.stem, *spec.stage_outs, *(w for stage in spec.stages for block in stage.blocks for w in block)]


def check_filled(result, budget_macs, knobs):
    """Largest-remainder fill: every width is alpha * d rounded down or up to the multiple (or the floor), and no
    width left rounded down can go up one multiple within the budget."""
    multiple, size = knobs["multiple"], knobs["input_size"]
    by_name = {layer["name"]: layer for layer in result.layers}
    spec = result.widths
    slots = [("conv1", lambda w: replace(spec, stem=w), spec.stem)]
    for i, stage in enumerate(spec.stages):
        slots.append((f"layer{i + 1}.0.conv3", lambda w, i=i: with_stage(spec, i, out=w), stage.out))
        for j, block in enumerate(stage.blocks):
            for k in (0, 1):
                slots.append(
                    (f"layer{i + 1}.{j}.conv{k + 1}", lambda w, i=i, j=j, k=k: with_block(spec, i, j, k, w), block[k])
                )
    for name, widened, width in slots:
        target = result.alpha * by_name[name]["d"]
        down, up = multiple * math.floor(target / multiple), multiple * math.ceil(target / multiple)
        assert width == by_name[name]["floor"] or down <= width <= up, (name, width, target)
        if width < target:
            assert body_cost(widened(width + multiple), *size)[1] > budget_macs, name


def with_stage(spec, i, **change):
    stages = list(spec.stages)
    stages[i] = replace(stages[i], **change)
    return replace(spec, stages=tuple(stages))


def with_block(spec, i, j, k, width):
    blocks = [list(b) for b in spec.stages[i].blocks]
    blocks[j][k] = width
    return with_stage(spec, i, blocks=tuple(tuple(b) for b in blocks))


# -- mapping ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("aggregate", "tied_from", "expected"),
    [
        ("max", "block_output", 60.0),
        ("mean", "block_output", 30.0),
        ("median", "block_output", 20.0),
        ("max", "conv3", 5.0),
    ],
)
def test_mapping_aggregate_and_tie_source(aggregate, tied_from, expected):
    spec = standard((1, 1, 3, 1), 0.25)
    outputs = {"layer3.0": 10.0, "layer3.1": 20.0, "layer3.2": 60.0}

    def d(name, channels):
        if name in outputs:
            return outputs[name]
        return 5.0 if name.startswith("layer3") and name.endswith("conv3") else channels / 2

    result = derive_widths(
        make_table(spec, d),
        spec,
        multiple=1,
        min_width=1,
        input_size=(64, 64),
        aggregate=aggregate,
        tied_from=tied_from,
    )
    by_name = {layer["name"]: layer for layer in result.layers}
    for name in ("layer3.0.conv3", "layer3.1.conv3", "layer3.2.conv3", "layer3.0.downsample.0"):
        assert by_name[name]["d"] == expected
        assert by_name[name]["derived"] == result.widths.stages[2].out
    assert by_name["layer2.0.conv2"]["d"] == spec.stages[1].blocks[0][1] / 2
    assert by_name["conv1"]["original"] == spec.stem and by_name["conv1"]["derived"] == result.widths.stem
    assert sum(layer["macs_derived"] for layer in result.layers) == result.body["derived"]["macs"]
    assert sum(layer["params_derived"] for layer in result.layers) == result.body["derived"]["params"]
    assert [layer["name"] for layer in result.layers] == [c[0] for c in convs(spec, 64, 64)]


# alpha 1.25 x d / multiple 4, by hand: the nearest multiple, halves up, never below the floor (4 here)
HAND_ROUNDED = {
    "conv1": (8, 12),  # 10 -> 2.5 multiples: half up to 12
    "layer1.0.conv1": (7, 8),  # 8.75 -> 2.19: 8
    "layer1.0.conv2": (10, 12),  # 12.5 -> 3.13: 12
    "layer1.0": (30, 36),  # 37.5 -> 9.38: 36 (the stage's tied out width)
    "layer2.0.conv1": (11, 12),  # 13.75 -> 3.44: 12
    "layer2.0.conv2": (12, 16),  # 15 -> 3.75: 16
    "layer2.0": (56, 72),  # 70 -> 17.5: half up to 72
    "layer3.0.conv1": (0.5, 4),  # 0.625 -> 0: the floor, 4
    "layer3.0.conv2": (26, 32),  # 32.5 -> 8.13: 32
    "layer3.0": (100, 124),  # 125 -> 31.25: 124
    "layer4.0.conv1": (5, 8),  # 6.25 -> 1.56: 8
    "layer4.0.conv2": (50, 64),  # 62.5 -> 15.6: 64
    "layer4.0": (200, 252),  # 250 -> 62.5: half up to 252
}


def test_alpha_times_d_rounds_to_the_nearest_multiple_by_hand():
    spec = standard((1, 1, 1, 1), 0.25)
    table = make_table(spec, lambda name, channels: HAND_ROUNDED.get(name, (channels, 0))[0])
    got = widths_at(table, spec, 1.25, multiple=4, min_width=1)
    w = {name: width for name, (_, width) in HAND_ROUNDED.items()}
    assert got.stem == w["conv1"]
    for i, stage in enumerate(got.stages, start=1):
        assert stage.out == w[f"layer{i}.0"] and stage.blocks == ((w[f"layer{i}.0.conv1"], w[f"layer{i}.0.conv2"]),)
    # floors round up to the multiple: min_width 5 -> 8, min_ratio 0.3 x 64 = 19.2 -> 20 (layer3.0.conv1)
    floored = widths_at(table, spec, 1.25, multiple=4, min_width=5, min_ratio=0.3)
    assert floored.stages[2].blocks[0][0] == 20 and floored.stages[3].blocks[0][0] == 40  # 0.3 x 128 = 38.4
    assert floored.stem == 12 and floored.stages[0].blocks[0][0] == 8  # 0.3 x 16 = 4.8 -> 8 = the min_width floor


def test_zero_measure_gets_floor_and_one_warning(capsys):
    spec = standard((1, 1, 1, 1), 0.25)
    zeros = {"layer1.0.conv1", "layer2.0.conv2"}
    table = make_table(spec, lambda name, channels: 0.0 if name in zeros else channels * 0.6)
    result = derive_widths(table, spec, multiple=4, min_width=6, input_size=(64, 64))
    assert result.widths.stages[0].blocks[0][0] == 8 and result.widths.stages[1].blocks[0][1] == 8
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "layer1.0.conv1" in lines[0] and "layer2.0.conv2" in lines[0]
    assert "warning" in lines[0] and "8" in lines[0]


# -- errors -------------------------------------------------------------------------------------------------


def one_line(exc_info):
    message = str(exc_info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("change", "kind", "words"),
    [
        (lambda t: t[t["canonical"] != "layer2.1.conv2"], EigpipeError, ["layer2.1.conv2", "missing"]),
        (
            lambda t: t.assign(channels=np.where(t["canonical"] == "layer3.0.conv1", 99, t["channels"])),
            EigpipeError,
            ["layer3.0.conv1", "99", "architecture"],
        ),
        (
            lambda t: t[~t["canonical"].str.startswith("layer4.2")],
            EigpipeError,
            ["layer4", "2 blocks", "3 in the spec"],
        ),
        (
            lambda t: t.assign(intrinsic_dim=np.where(t["canonical"] == "layer1.0", np.nan, t["intrinsic_dim"])),
            EigpipeError,
            ["layer1.0", "nan"],
        ),
        (lambda t: pd.concat([t, t.assign(run="other")]), EigpipeError, ["other", "snapshots"]),
        (lambda t: pd.concat([t, t.assign(iteration=7)]), EigpipeError, ["@7", "snapshots"]),
        (lambda t: t.drop(columns=["intrinsic_dim"]), EigpipeError, ["intrinsic_dim", "column"]),
    ],
)
def test_table_errors(change, kind, words):
    spec = standard((1, 2, 1, 3), 0.25)
    with pytest.raises(kind) as info:
        derive_widths(change(make_table(spec)), spec, input_size=(64, 64))
    message = one_line(info)
    assert all(word in message for word in words), message
    assert str(spec.stages[2].blocks[0][0]) in message or "layer3.0.conv1" not in message


def test_unknown_measure_and_unreachable_budget():
    spec = standard((1, 1, 1, 1), 0.25)
    with pytest.raises(ConfigError) as info:
        derive_widths(make_table(spec), spec, measure="dims", input_size=(64, 64))
    assert "dims" in one_line(info) and all(m in str(info.value) for m in MEASURES)
    floor_macs = body_cost(
        WidthSpec.from_dict({"stem": 16, "stages": [{"out": 16, "blocks": [[16, 16]]} for _ in range(4)]}), 64, 64
    )[1]
    with pytest.raises(EigpipeError) as info:
        derive_widths(make_table(spec), spec, min_width=16, macs_budget=0.2, input_size=(64, 64))
    message = one_line(info)
    assert f"{floor_macs:,}" in message and "cannot be met" in message and "0.2" in message
    with pytest.raises(EigpipeError) as info:  # min_ratio 1 keeps every width: only a budget >= 1 is reachable
        derive_widths(make_table(spec), spec, min_width=1, min_ratio=1.0, macs_budget=0.99, input_size=(64, 64))
    message = one_line(info)
    assert "cannot be met" in message and "1.0 x its original width" in message, message
    with pytest.raises(ConfigError, match="min_ratio"):
        derive_widths(make_table(spec), spec, min_ratio=1.5, input_size=(64, 64))


def test_the_study_check_refuses_exactly_the_budgets_the_derivation_cannot_meet():
    """At DAG start, before any training, the study check finds what the derivation would find after it."""
    from eigpipe import study

    smoke = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "smoke.yaml").read_text())
    spec = standard(smoke["model"]["depths"], smoke["model"]["width_multiplier"])
    outcomes = set()
    for budget, min_width, min_ratio, multiple in itertools.product((0.3, 0.6, 1.0, 1.5), (4, 8, 16), (0, 0.5), (4,)):
        knobs = {"macs_budget": budget, "min_width": min_width, "min_ratio": min_ratio, "multiple": multiple}
        try:
            derive_widths(make_table(spec), spec, input_size=(64, 64), **knobs)
            met = True
        except EigpipeError as exc:
            assert "cannot be met" in str(exc)
            met = False
        outcomes.add(met)
        given = {**smoke, "widths": {**smoke["widths"], **knobs}}
        if met:
            study.check(given, [])
        else:
            with pytest.raises(ConfigError, match=rf"^config: widths.macs_budget: {budget} x the body's MACs"):
                study.check(given, [])
    assert outcomes == {True, False}


# -- paper scale --------------------------------------------------------------------------------------------


def test_paper_scale_resnet50_faster_rcnn():
    spec = standard((3, 4, 6, 3), 1.0)
    result = derive_widths(make_table(spec, seed=3), spec, multiple=8, input_size=(224, 224))
    assert result.body["original"] == {"params": 23_508_032, "macs": 4_087_136_256}
    assert 0.99 < result.body["ratio"]["macs"] <= 1.0
    cfg = model_cfg(norm="gn", min_size=224, max_size=224)
    model = build_detector("faster_rcnn", cfg, 91, widths=result.widths).eval()
    assert count_params(model.backbone.body) == result.body["derived"]["params"]
    assert count_macs(model.backbone.body, torch.zeros(1, 3, 224, 224)) == result.body["derived"]["macs"]
    with torch.no_grad():
        detections = model([torch.rand(3, 96, 128)])
    assert detections[0]["boxes"].shape[1] == 4


# -- the stage ----------------------------------------------------------------------------------------------


@pytest.fixture
def source(tmp_path, tiny_model):
    cfg = tiny_model
    original = standard(cfg["depths"], cfg["width_multiplier"])
    model = build_detector("faster_rcnn", cfg, 3, original)
    meta = {
        "task": "detection",
        "model_name": "faster_rcnn",
        "model_config": cfg,
        "widths": original.to_dict(),
        "num_classes": 3,
        "run": "faster_rcnn-scratch",
        "init": "scratch",
        "iteration": 8,
    }
    checkpoint = tmp_path / "train" / "final.pt"
    save_checkpoint(checkpoint, model, meta)
    table = pd.concat([make_table(original, iteration=0, seed=1), make_table(original, iteration=8, seed=2)])
    dimensions = tmp_path / "dimensions.parquet"
    table.to_parquet(dimensions, index=False)
    return cfg, original, checkpoint, dimensions, table


def test_derive_stage_end_to_end(source, tmp_path, capsys):
    cfg, original, checkpoint, dimensions, table = source
    out = tmp_path / "derived" / "widths.yaml"
    record = derive(widths_cfg(multiple=4, min_width=4), dimensions, checkpoint, out)
    spec = WidthSpec.load(out)
    written = yaml.safe_load(out.read_text())
    assert set(written) == {"stem", "stages", "derivation"} and written["derivation"] == record
    assert record["source"]["run"] == "faster_rcnn-scratch" and record["source"]["iteration"] == 8
    assert len(record["source"]["dimensions_sha256"]) == 64 and len(record["source"]["checkpoint_sha256"]) == 64
    assert record["input_size"] == [64, 64] and record["measure"] == "intrinsic_dim"
    assert str(dimensions) in record["provenance"]["inputs"] and str(checkpoint) in record["provenance"]["inputs"]
    final = table[table["iteration"] == 8].set_index("canonical")["intrinsic_dim"]
    assert all(layer["d"] == final[layer["source"]] for layer in record["layers"] if "," not in layer["source"])
    assert WidthSpec.from_dict(record["original_widths"]) == original
    measured = model_complexity(build_detector("faster_rcnn", cfg, 3, widths=spec), 64, 64)
    assert measured["detector_params"] == record["detector"]["derived"]["params"]
    assert measured["detector_macs"] == record["detector"]["derived"]["macs"]
    assert measured["body_params"] == record["body"]["derived"]["params"]
    assert measured["body_macs"] == record["body"]["derived"]["macs"] <= record["body"]["original"]["macs"]
    assert record["body"]["ratio"]["macs"] == record["body"]["derived"]["macs"] / record["body"]["original"]["macs"]
    assert "alpha" in capsys.readouterr().err
    earlier = derive(widths_cfg(multiple=4, min_width=4, source_iteration=0), dimensions, checkpoint, out)
    assert earlier["source"]["iteration"] == 0
    first = table[table["iteration"] == 0].set_index("canonical")["intrinsic_dim"]
    assert (first != final).any()  # the two snapshots' measures differ, so the test tells them apart
    assert all(layer["d"] == first[layer["source"]] for layer in earlier["layers"] if "," not in layer["source"])


def test_widths_that_split_groupnorm_groups_are_named_in_one_warning(source, tmp_path, capsys):
    """The tiny model has 4 GroupNorm groups: multiples of 4 keep them, multiples of 2 give some layers gcd 2."""
    cfg, original, checkpoint, dimensions, _ = source
    derive(widths_cfg(multiple=4, min_width=4), dimensions, checkpoint, tmp_path / "by4.yaml")
    assert "GroupNorm" not in capsys.readouterr().err
    record = derive(widths_cfg(multiple=2, min_width=2), dimensions, checkpoint, tmp_path / "by2.yaml")
    split = [layer["name"] for layer in record["layers"] if layer["derived"] % 4]
    assert split, "the planted table should give some width that is not a multiple of 4"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "GroupNorm" in line]
    assert len(warnings) == 1 and f"{len(split)} convs" in warnings[0] and split[0] in warnings[0]


@pytest.mark.parametrize(
    ("widths", "change", "words"),
    [
        ({"macs_budget": 0.01}, None, ["cannot be met"]),
        ({"source_iteration": 5}, None, ["iteration 5", "0, 8"]),
        ({}, lambda t: t[t["canonical"] != "layer1.0"], ["layer1.0", "missing"]),
        ({}, lambda t: t.assign(channels=t["channels"] * 2), ["conv1", "architecture"]),
    ],
)
def test_derive_stage_errors_write_nothing(source, tmp_path, widths, change, words):
    _, _, checkpoint, dimensions, table = source
    if change is not None:
        change(table).to_parquet(dimensions, index=False)
    out = tmp_path / "derived" / "widths.yaml"
    with pytest.raises(EigpipeError) as info:
        derive(widths_cfg(**widths), dimensions, checkpoint, out)
    message = one_line(info)
    assert all(word in message for word in words) and str(dimensions) in message, message
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_a_downsample_conv_in_one_body_only(source, tmp_path):
    """At 16 px the budget leaves layer1's output at the stem's width: the derived body has no layer1 downsample
    (in == out), the original has; the GroupNorm check compares convs of both bodies only."""
    _, _, checkpoint, dimensions, _ = source
    record = derive(widths_cfg(input_size=[16, 16]), dimensions, checkpoint, tmp_path / "w.yaml")
    assert [layer["name"] for layer in record["layers"] if layer["derived"] is None] == ["layer1.0.downsample.0"]
