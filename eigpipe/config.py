"""Study configuration: load YAML, validate against the schema (filling defaults), pick sections."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from eigpipe.errors import ConfigError

SCHEMA_PATH = Path(__file__).parent / "schemas" / "config.schema.yaml"


@cache
def schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _validator_with_defaults(cls: type) -> type:
    """A jsonschema validator class that also fills in defaults (the recipe from jsonschema's FAQ)."""
    validate_properties = cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema_):  # noqa: ANN001
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = json.loads(json.dumps(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema_)

    return jsonschema.validators.extend(cls, {"properties": set_defaults})


_Validator = _validator_with_defaults(jsonschema.Draft202012Validator)


def _format_error(error: jsonschema.ValidationError, source: str) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top>"
    return f"{source}: {where}: {error.message}"


def validate(config: dict, source: str = "config", subschema: dict | None = None) -> dict:
    """Validate ``config`` in place (defaults filled in) and return it; raise ConfigError naming the key."""
    root = schema()
    target = root if subschema is None else {**subschema, "$defs": root["$defs"]}
    error = jsonschema.exceptions.best_match(_Validator(target).iter_errors(config))
    if error is not None:
        raise ConfigError(_format_error(error, source))
    return config


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a YAML (or JSON) file; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{path}: {what} not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def load(path: str | Path) -> dict:
    """Load and validate a whole study config file."""
    config = read_yaml(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    return validate(config, str(path))


def sections(
    config_file: str | Path | None = None, config_json: str | None = None, names: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The config sections a stage reads: from a whole study file, or from the JSON a rule passes.

    A rule passes only its own sections (``--config-json``), so each is validated on its own here.
    """
    if config_json is not None:
        try:
            given = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config-json: not valid JSON ({exc})") from None
        for name, value in given.items():
            sub = schema()["properties"].get(name)
            if sub is None:
                raise ConfigError(f"--config-json: {name}: unknown config section")
            given[name] = validate(value, f"--config-json: {name}", subschema=sub)
    elif config_file is not None:
        given = load(config_file)
    else:
        raise ConfigError("give --config FILE or --config-json JSON")
    for name in names:
        sub = schema()["properties"].get(name, {})
        if name not in given and "default" in sub:
            given[name] = validate(json.loads(json.dumps(sub["default"])), f"config: {name}", subschema=sub)
    missing = [n for n in names if n not in given]
    if missing:
        raise ConfigError(f"config: missing section(s) {', '.join(missing)}")
    return given


def detector_schedule(train: dict, init: str) -> dict:
    """The schedule of one init's detectors: ``train.schedule`` with that init's ``train.steps_by_init``."""
    steps = train.get("steps_by_init", {}).get(init, train["schedule"]["steps"])
    return {**train["schedule"], "steps": steps}


def dumps(sections_: dict[str, Any]) -> str:
    """Canonical JSON for ``--config-json`` (what the Snakefile passes as a rule's params)."""
    return json.dumps(sections_, sort_keys=True, separators=(",", ":"))
