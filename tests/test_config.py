"""Study configs: schema validation with defaults, one-line errors naming the key, per-stage sections."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from eigpipe import cli, config
from eigpipe.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["config.yaml", "smoke.yaml", "coco.yaml"])
def test_shipped_configs_are_valid(name):
    loaded = config.load(ROOT / "config" / name)
    assert loaded["train"]["schedule"]["steps"] >= 1 and loaded["runtime"]["threads"] >= 1


def test_defaults_are_filled_in():
    loaded = config.load(ROOT / "config" / "config.yaml")
    assert loaded["train"]["schedule"]["momentum"] == 0.9
    assert loaded["spectrum"]["threshold"] == 1e-3


@pytest.mark.parametrize(
    ("edit", "where"),
    [
        (lambda c: c["train"]["schedule"].update(lr=-1), "train.schedule.lr"),
        (lambda c: c["model"].update(norm="layer"), "model.norm"),
        (lambda c: c["train"].update(models=["yolo"]), "train.models.0"),
        (lambda c: c.update(trian={}), "trian"),
        (lambda c: c["data"].update(source=None), "data.source"),
    ],
)
def test_errors_name_the_key(tmp_path, edit, where):
    data = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}:") and (where in message) and "\n" not in message


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("study: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")


def test_sections_from_json_are_validated_on_their_own():
    given = json.dumps({"spectrum": {"threshold": 0.01}, "seed": 4})
    got = config.sections(config_json=given, names=("spectrum", "seed"))
    spectrum = {"threshold": 0.01, "relative_threshold": 1e-3, "soft_lambda": 1e-3}
    assert got == {"spectrum": {**spectrum, "saturation_threshold": 0.99, "alpha_ranks": [6, 100]}, "seed": 4}
    assert config.sections(config_json=given, names=("spectrum",)).keys() == {"spectrum"}  # exactly its sections
    with pytest.raises(ConfigError, match="spectrum.threshold|threshold"):
        config.sections(config_json=json.dumps({"spectrum": {"threshold": -1}}))
    with pytest.raises(ConfigError, match="unknown config section"):
        config.sections(config_json=json.dumps({"nope": {}}))
    assert config.sections(config_json="{}", names=("spectrum",))["spectrum"]["threshold"] == 1e-3
    with pytest.raises(ConfigError, match="missing section"):
        config.sections(config_json="{}", names=("model",))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"covariance.images": -3}, "covariance.images: -3 is less than the minimum of 1"),
        ({"covariance.images": 0}, "covariance.images: 0 is less than the minimum of 1"),
        ({"covariance.layers": []}, "covariance.layers: [] should be non-empty"),
    ],
)
def test_command_line_overrides_are_validated_like_the_config(overrides, fragment, tmp_path):
    with pytest.raises(ConfigError) as info:
        config.sections(config_json="{}", names=("covariance",), overrides=overrides)
    assert fragment in str(info.value)
    study = tmp_path / "study.yaml"  # a valid file: the value given on the command line is blamed, not the file
    study.write_text((ROOT / "config" / "smoke.yaml").read_text())
    with pytest.raises(ConfigError) as info:
        config.sections(study, names=("covariance",), overrides=overrides)
    assert str(info.value).startswith("command line: ") and fragment in str(info.value)
    got = config.sections(config_json="{}", names=("covariance",), overrides={"covariance.images": 5})
    assert got["covariance"]["images"] == 5


@pytest.mark.parametrize("text", ["[1]", "3", '"x"', "null", '{"covariance": [1]}', "{"])
def test_config_json_of_the_wrong_shape_is_one_line(text, capsys, tmp_path):
    code = cli.main(["spectrum", "--config-json", text, str(tmp_path / "s.zarr"), "--out", str(tmp_path / "t.parquet")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--config-json" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"spectrum": {}, "spectrum": {"threshold": 0.5}}', "spectrum"),
        ('{"spectrum": {"threshold": 0.5, "threshold": 0.1}}', "threshold"),
    ],
)
def test_a_json_key_given_twice_is_refused_not_overridden(text, key):
    """JSON keeps the last of two equal keys silently; a section or knob given twice is an error, as in YAML."""
    with pytest.raises(ConfigError, match=rf"^--config-json: key '{key}' given twice$"):
        config.sections(config_json=text, names=("spectrum",))


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"pretrain": {"source": "torchvision"}}, "weights"),
        ({"pretrain": {"source": "synthetic"}}, "schedule"),
        ({"data": {"source": "coco"}}, "coco"),
    ],
)
def test_cross_field_rules_live_in_the_schema(section, fragment):
    name = next(iter(section))
    with pytest.raises(ConfigError, match=fragment):
        config.validate(section[name], name, config.schema()["properties"][name])


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    code = cli.main(["synth-data", "--config-json", "{not json", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--config-json" in err
    assert not (tmp_path / "d").exists()


def test_detector_schedule_takes_the_steps_of_its_init():
    train = config.validate(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))["train"]
    train["steps_by_init"] = {"pretrained": 7}
    assert config.detector_schedule(train, "pretrained") == {**train["schedule"], "steps": 7}
    assert config.detector_schedule(train, "scratch") == train["schedule"]


# ---- values the schema alone lets through, and files that are no config: one line naming the key or file ----

NAN, INF = float("nan"), float("inf")


def _smoke_with(tmp_path: Path, **changes) -> Path:
    """config/smoke.yaml with dotted keys changed (a list index may be a key: "model.anchor_sizes.2")."""
    data = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = data
        for name in parents:
            node = node[int(name)] if isinstance(node, list) else node.setdefault(name, {})
        node[int(last) if isinstance(node, list) else last] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _refused(path: Path, key: str) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and key in message and "\n" not in message, message
    return message


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("spectrum.threshold", NAN),
        ("train.schedule.lr", NAN),
        ("widths.macs_budget", INF),
        ("model.width_multiplier", INF),
        ("model.box_score_thresh", -INF),
        ("train.schedule.clip_grad_norm", NAN),
        ("model.anchor_sizes.2", INF),
        ("data.synthetic.min_visible_share", NAN),
        ("pretrain.schedule.momentum", NAN),
    ],
)
def test_non_finite_numbers_are_refused(tmp_path, key, value):
    assert "not a finite number" in _refused(_smoke_with(tmp_path, **{key: value}), key)


@pytest.mark.parametrize(
    ("section", "text"),
    [
        ("spectrum", '{"spectrum": {"threshold": NaN}}'),
        ("spectrum", '{"spectrum": {"soft_lambda": Infinity}}'),
        ("widths", '{"widths": {"min_ratio": -Infinity}}'),
    ],
)
def test_non_finite_numbers_in_config_json_are_refused(section, text):
    with pytest.raises(ConfigError, match=rf"--config-json: {section}\.\w+: .* is not a finite number"):
        config.sections(config_json=text, names=(section,))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.schedule.steps", 6.0),
        ("covariance.images", 8.0),
        ("model.depths.0", 3.0),
        ("seed", 1.0),
        ("widths.multiple", 4.0),
        ("runtime.threads", 1.0),
        ("data.synthetic.image_size", 64.0),
        ("train.seeds", [0, 1.0]),
    ],
)
def test_whole_floats_are_refused_in_integer_keys(tmp_path, key, value):
    assert "is not of type 'integer'" in _refused(_smoke_with(tmp_path, **{key: value}), key)


@pytest.mark.parametrize(
    "key",
    [
        "model.aspect_ratios",
        "model.mask_head_layers",
        "model.box_head.conv_layers",
        "covariance.layers",
        "train.models",
        "widths.measures",
        "train.seeds",
        "data.synthetic.categories",
    ],
)
def test_empty_lists_are_refused_where_they_mean_nothing(tmp_path, key):
    _refused(_smoke_with(tmp_path, **{key: []}), key)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("widths.macs_budget", 1e6),
        ("model.width_multiplier", 1e3),
        ("model.fpn_channels", 2_000_000_000),
        ("data.synthetic.image_size", 10**6),
        ("train.schedule.momentum", 1.5),
        ("model.depths.2", 10_000),
        ("widths.measure", "intrinsic_dimension"),
        ("model.widths", ""),
    ],
)
def test_values_beyond_sensible_bounds_are_refused(tmp_path, key, value):
    _refused(_smoke_with(tmp_path, **{key: value}), key)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"train.schedule.snapshots": [0, 6]}, "train.schedule.snapshots"),  # 6 steps: the final model, no snapshot
        ({"train.schedule.snapshots": [0, 3, 50]}, "train.schedule.snapshots"),
        (  # 3 is inside the scratch runs (6 steps), past the pretrained ones
            {"train.steps_by_init": {"pretrained": 2}, "train.schedule.snapshots": [0, 3]},
            "train.schedule.snapshots",
        ),
        ({"pretrain.schedule.snapshots": [4]}, "pretrain.schedule.snapshots"),
        ({"train.schedule.lr_steps": [100]}, "train.schedule.lr_steps"),
        ({"train.schedule.lr_steps": [2.5]}, "train.schedule.lr_steps"),
        ({"train.schedule.warmup_steps": 6}, "train.schedule.warmup_steps"),
        ({"data.synthetic.min_objects": 4}, "data.synthetic.min_objects"),
    ],
)
def test_iterations_and_ranges_that_cannot_happen_are_refused(tmp_path, changes, key):
    _refused(_smoke_with(tmp_path, **changes), key)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("seed: 0\nseed: 1\n", 2),
        ("train:\n  schedule:\n    lr: 0.1\n    steps: 3\n    lr: 0.2\n", 5),
        ("spectrum: {threshold: 0.1, threshold: 0.2}\n", 1),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path, text, line):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^{path}: not valid YAML \(line {line}, .*given twice"):
        config.read_yaml(path)


def test_anchors_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("base: &b {lr: 0.1, steps: 3}\nother:\n  <<: *b\n  lr: 0.2\n")
    assert config.read_yaml(path)["other"] == {"lr": 0.2, "steps": 3}


WIDTHS = {"stem": 8, "stages": [{"out": 16, "blocks": [[4, 4]]} for _ in range(4)]}


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda w: w.update(stages=None), "stages"),
        (lambda w: w["stages"][1].update(out=2_000_000_000), "stages.1.out"),
        (lambda w: w.update(stems=8), "stems"),
        (lambda w: w["stages"][0]["blocks"][0].__setitem__(1, 4.0), "stages.0.blocks.0.1"),
        (lambda w: w["stages"].pop(), "stages"),
        (lambda w: w["stages"][2]["blocks"][0].append(4), "stages.2.blocks.0"),
        (lambda w: w["stages"][3].update(blocks=[]), "stages.3.blocks"),
        (lambda w: w.update(stem=NAN), "stem"),
    ],
)
def test_bad_widths_specs_are_one_line_naming_the_key(tmp_path, edit, key):
    from eigpipe.models.widths import WidthSpec

    spec = json.loads(json.dumps(WIDTHS))
    edit(spec)
    path = tmp_path / "widths.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as info:
        WidthSpec.load(path)
    assert str(info.value).startswith(f"{path}: {key}") and "\n" not in str(info.value)
    assert WidthSpec.from_dict({**WIDTHS, "derivation": {"alpha": 1.0}}).stem == 8  # the record it writes


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text file"),
        ("study: x\n".encode("utf-16"), "not a text file"),
        (b"\x00\x01\x02\x03", "not valid YAML"),
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b"a:\n" + b"".join(b"  " * i + b"- \n" for i in range(1, 2000)), "nested too deeply"),
    ],
)
@pytest.mark.parametrize("command", [["complexity", "--config"], ["check-config"]])
def test_files_that_are_no_config_are_one_line(tmp_path, capsys, content, fragment, command):
    """check-config too: it is what the README offers where Snakemake's --configfile gives a traceback."""
    path = tmp_path / "study.yaml"
    path.write_bytes(content)
    code = cli.main([*command, str(path)])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and f"{path}: " in err and fragment in err, err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["complexity", "--config-json", '{"model": ' * 3000 + "1" + "}" * 3000], "--config-json: nested too deeply"),
        (["complexity", "--config-json", '{"model": ' + "[" * 900 + "]" * 900 + "}"], "--config-json: model"),
    ],
)
def test_deeply_nested_config_json_is_one_line(capsys, argv, fragment):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and fragment in err, err


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("study: x\ndata: {source: synthetic\nmodel: [\n", "not valid YAML (line 3, column 6"),  # what Snakemake
        ("seed: 0\nseed: 1\n", "not valid YAML (line 2, column 1: key 'seed' given twice"),  # cannot name
        ("- study: x\n", "a study file is a mapping of sections"),
        ("study: x\n", "data: missing (required)"),
    ],
)
def test_check_config_names_file_line_and_key(tmp_path, capsys, content, fragment):
    path = tmp_path / "study.yaml"
    path.write_text(content)
    assert cli.main(["check-config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}: {fragment}" in err, err


def test_check_config_merges_overlays_as_snakemake_does(tmp_path, capsys):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("train: {seeds: [0, 1]}\nspectrum: {threshold: .nan}\n")
    assert cli.main(["check-config", str(ROOT / "config" / "smoke.yaml")]) == 0
    assert cli.main(["check-config", str(ROOT / "config" / "smoke.yaml"), str(overlay)]) == 1
    assert "spectrum.threshold: nan is not a finite number" in capsys.readouterr().err
    overlay.write_text("train: {seeds: [0, 1]}\n")  # merged into train, keeping its models, inits and schedule
    assert cli.main(["check-config", str(ROOT / "config" / "smoke.yaml"), str(overlay)]) == 0


TV_IMPORT = {"preset": "torchvision/fasterrcnn_resnet50_fpn", "weights": "w.pth", "init": "pretrained"}


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"covariance.layers": ["backbone.body.layer9.*"]}, "covariance.layers: selector 'backbone.body.layer9.*'"),
        ({"covariance.layers": ["*fpn.inner_blocks.*"]}, "matches no module of the model (the classifier)"),
        (  # the classifier's modules all output tensors; the detectors' transform, RPN, FPN ... do not
            {"covariance.layers": ["*"]},
            "covariance.layers: transform (GeneralizedRCNNTransform) is selected, but its output is no feature tensor",
        ),
        ({"report.layers": ["layer1.0.conv3", "layer5.0.conv1"]}, "report.layers: layer5.0.conv1 is not a layer"),
        ({"covariance.layers": ["Bottleneck:*"], "report.layers": ["conv1"]}, "report.layers: conv1 is not a layer"),
        ({"widths.source_iteration": 2}, "widths.source_iteration: 2 is not one of train.schedule.snapshots"),
        ({"train.inits": ["pretrained"]}, "widths.source_init: scratch is not in train.inits"),
        ({"model.widths": "none.yaml"}, "model.widths: none.yaml: not found"),
        ({"study": ".."}, "study: '..' is a name of dots only"),
        ({"study": "run" + "ab" * 20}, "ends in a part repeated 20 times"),
        ({"study": "a" * 65}, "study: 'aaaa"),
        ({"imports": {"...": TV_IMPORT}}, "imports....: '...' is a name of dots only"),
        ({"imports": {"classifier": TV_IMPORT}}, "imports.classifier: is the pre-trained classifier's run name"),
        ({"imports": {"tv-s1": TV_IMPORT}}, "imports.tv-s1: is a replicate's name"),
        ({"train.seeds": [1, 2]}, "train.seeds: [1, 2] lacks the study seed 0"),
        ({"covariance.folds": 1}, "covariance.folds: 1 fold gives no jackknife"),
        ({"covariance.folds": 9}, "covariance.folds: 9 folds need at least 9 images, got 8"),
        ({"spectrum.alpha_ranks": [100, 6]}, "spectrum.alpha_ranks: first rank 100 is after the last 6"),
        (
            {"model.norm": "bn", "model.min_size": 32, "model.max_size": 32, "train.schedule.batch_size": 1},
            "train.schedule.batch_size: 1 image of 32 px leaves BatchNorm",
        ),
        ({"pretrain": {"source": "torchvision", "weights": "w.pth"}}, "pretrain.source: torchvision's ResNet-50"),
        (
            {"pretrain": {"source": "torchvision", "weights": "w.pth"}, "model.width_multiplier": 1.0},
            "train.init_gn_from_bn: false, but torchvision's BatchNorm-trained weights",
        ),
        ({"spectrum.treshold": 0.01}, "spectrum.treshold: unknown key (known: threshold,"),
    ],
)
def test_the_whole_study_is_checked_as_at_dag_start(tmp_path, changes, fragment):
    from eigpipe import study

    path = _smoke_with(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        study.check(yaml.safe_load(path.read_text()), [path])
    assert str(info.value).startswith(f"{path}: ") and fragment in str(info.value), str(info.value)
    assert "\n" not in str(info.value)
    fine = {"covariance.layers": ["default", "*body.conv1"], "report.layers": ["conv1"], "train.inits": ["scratch"]}
    assert study.check(yaml.safe_load(_smoke_with(tmp_path, **fine).read_text()), [])["report"]["layers"] == ["conv1"]


@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("data.coco.val_annotations", "results/smoke/data/detection/instances_val.json"),
        ("pretrain.weights", "results/smoke/pretrain/final.pt"),
        ("imports.tv.weights", "results/smoke/import/tv.pt"),
        ("model.widths", "results/smoke/widths/faster_rcnn-derived.yaml"),
    ],
)
def test_the_users_files_exist_outside_the_studys_results(tmp_path, monkeypatch, key, where):
    """The workflow deletes its outputs before it remakes them: a file of the user's there would be lost."""
    from eigpipe import study
    from eigpipe.models import standard

    monkeypatch.chdir(tmp_path)
    model = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())["model"]
    coco = {
        f"{split}_{kind}": f"mine/{split}_{kind}" for split in ("train", "val") for kind in ("annotations", "images")
    }
    changes = {
        "data.source": "coco",
        "data.coco": coco,
        "imports": {"tv": {**TV_IMPORT, "weights": "mine/w.pth"}},
        "pretrain": {"source": "detectron2", "weights": "mine/w.pth"},
        "model.widths": "mine/widths.yaml",
    }
    (tmp_path / "mine").mkdir()
    for path in [*coco.values(), "mine/w.pth"]:
        Path(path).write_text("")
    spec = standard(model["depths"], model["width_multiplier"]).to_dict()
    Path("mine/widths.yaml").write_text(yaml.safe_dump(spec))
    assert study.check(yaml.safe_load(_smoke_with(tmp_path, **changes).read_text()), [])
    Path(where).parent.mkdir(parents=True)
    Path(where).write_text(yaml.safe_dump(spec))
    moved = yaml.safe_load(_smoke_with(tmp_path, **{**changes, key: where}).read_text())
    with pytest.raises(ConfigError, match=f"{key}: {where} is inside results/smoke/, which the workflow writes"):
        study.check(moved, [])
    Path(where).unlink()
    with pytest.raises(ConfigError, match=f"{key}: {where}: not found"):
        study.check(moved, [])


def test_a_results_folder_that_loops_is_one_line_at_dag_start(tmp_path, monkeypatch):
    from eigpipe import study

    monkeypatch.chdir(tmp_path)
    Path("results").mkdir()
    Path("results/smoke").symlink_to("smoke")
    Path("w.yaml").write_text("")
    changes = {"pretrain": {"source": "detectron2", "weights": "w.yaml"}}
    with pytest.raises(ConfigError, match="pretrain.weights: results/smoke: a symbolic link that loops"):
        study.check(yaml.safe_load(_smoke_with(tmp_path, **changes).read_text()), [])


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["covariance", "--images", "nan"], "argument --images: invalid int value: 'nan'"),
        (["train", "--model", "yolo", "--out", "x"], "argument --model: invalid choice: 'yolo'"),
        (["spectrum"], "the following arguments are required"),
        (["nope"], "argument COMMAND: invalid choice: 'nope'"),
    ],
)
def test_a_bad_command_line_argument_is_one_line(capsys, argv, fragment):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.count("\n") == 1 and fragment in err and "--help" in err, err


def test_the_check_at_dag_start_imports_no_torch():
    """Snakemake checks the study at every DAG start (even a dry run): importing torch there costs seconds."""
    code = (
        "import sys, yaml; from eigpipe import study; "
        "study.check(yaml.safe_load(open('config/smoke.yaml')), ['config/smoke.yaml']); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_fifo_or_a_device_given_as_a_file_is_one_line_not_a_hang(tmp_path, capsys):
    """Reading a FIFO waits for a writer forever; reading /dev/zero fills the memory."""
    import os

    from eigpipe import study

    fifo = tmp_path / "mine.fifo"
    os.mkfifo(fifo)
    for argv in (["check-config", str(fifo)], ["complexity", "--config", "/dev/zero"]):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.count("\n") == 1 and f"{argv[-1]}: not a regular file" in err, err
    with pytest.raises(ConfigError, match=f"^{fifo}: not a regular file .*, not a widths spec$"):
        config.read_yaml(fifo, "widths spec")
    weights = yaml.safe_load(
        _smoke_with(tmp_path, **{"pretrain": {"source": "detectron2", "weights": str(fifo)}}).read_text()
    )
    with pytest.raises(ConfigError, match=f"pretrain.weights: {fifo}: not a regular file or folder"):
        study.check(weights, [])
