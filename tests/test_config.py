"""Study configs: schema validation with defaults, one-line errors naming the key, per-stage sections."""

import json
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
def test_command_line_overrides_are_validated_like_the_config(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        config.sections(config_json="{}", names=("covariance",), overrides=overrides)
    assert fragment in str(info.value)
    got = config.sections(config_json="{}", names=("covariance",), overrides={"covariance.images": 5})
    assert got["covariance"]["images"] == 5


@pytest.mark.parametrize("text", ["[1]", "3", '"x"', "null", '{"covariance": [1]}'])
def test_config_json_of_the_wrong_shape_is_one_line(text, capsys, tmp_path):
    code = cli.main(["spectrum", "--config-json", text, str(tmp_path / "s.zarr"), "--out", str(tmp_path / "t.parquet")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--config-json" in err and "Traceback" not in err


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
