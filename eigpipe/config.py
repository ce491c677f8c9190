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


def _format_error(error: jsonschema.ValidationError, source: str, prefix: str) -> str:
    where = ".".join([prefix, *map(str, error.absolute_path)] if prefix else map(str, error.absolute_path))
    return f"{source}: {where or '<top>'}: {error.message}"


def validate(config: Any, source: str = "config", subschema: dict | None = None, prefix: str = "") -> Any:
    """Validate ``config`` in place (defaults filled in) and return it; raise ConfigError naming the key
    (``prefix`` is the path of a section validated on its own)."""
    root = schema()
    target = root if subschema is None else {**subschema, "$defs": root["$defs"]}
    error = jsonschema.exceptions.best_match(_Validator(target).iter_errors(config))
    if error is not None:
        raise ConfigError(_format_error(error, source, prefix))
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


def _whole(config: Any, source: str) -> dict:
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: a config must be a mapping of sections")
    return config


def load(path: str | Path) -> dict:
    """Load and validate a whole study config file."""
    return validate(_whole(read_yaml(path), str(path)), str(path))


def _apply(given: dict, overrides: dict[str, Any]) -> None:
    """Set ``section.key`` values given on the command line (None: not given) before validation."""
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        if not isinstance(given.get(section, {}), dict):
            raise ConfigError(f"config: {section} is not a section")
        given.setdefault(section, {})[key] = value


def _default_section(name: str) -> Any:
    sub = schema()["properties"].get(name, {})
    if "default" not in sub:
        raise ConfigError(f"config: missing section {name}")
    return validate(json.loads(json.dumps(sub["default"])), f"config: {name}", subschema=sub)


def sections(
    config_file: str | Path | None = None,
    config_json: str | None = None,
    names: tuple[str, ...] = (),
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Exactly the validated config sections ``names`` of a stage: from a whole study file, or from the JSON
    a rule passes (only its own sections, each validated on its own). ``overrides`` ("section.key": value)
    replace keys before validation, so command-line values are checked like the config's own."""
    if config_json is not None:
        try:
            given = _whole(json.loads(config_json), "--config-json")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config-json: not valid JSON ({exc})") from None
        _apply(given, overrides or {})
        for name, value in given.items():
            sub = schema()["properties"].get(name)
            if sub is None:
                raise ConfigError(f"--config-json: {name}: unknown config section")
            given[name] = validate(value, "--config-json", subschema=sub, prefix=name)
    elif config_file is not None:
        given = _whole(read_yaml(config_file), str(config_file))
        _apply(given, overrides or {})
        validate(given, str(config_file))
    else:
        raise ConfigError("give --config FILE or --config-json JSON")
    return {name: given[name] if name in given else _default_section(name) for name in names}


def detector_schedule(train: dict, init: str) -> dict:
    """The schedule of one init's detectors: ``train.schedule`` with that init's ``train.steps_by_init``."""
    steps = train["steps_by_init"].get(init, train["schedule"]["steps"])
    return {**train["schedule"], "steps": steps}


def dumps(sections_: dict[str, Any]) -> str:
    """Canonical JSON for ``--config-json`` (what the Snakefile passes as a rule's params)."""
    return json.dumps(sections_, sort_keys=True, separators=(",", ":"))
