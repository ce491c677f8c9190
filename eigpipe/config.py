"""Study configuration: load YAML, validate against the schema (filling defaults), pick sections.

Beyond JSON Schema's own rules, every number must be finite (JSON Schema lets NaN and Infinity through every
bound), an integer key takes only integers (JSON Schema counts 4.0 as one), a YAML file may not give a key
twice (PyYAML keeps the last silently), and a few rules that span keys of one section (below) are checked
wherever that section is validated: in a whole study file, in a stage's ``--config-json``, at DAG start.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from functools import cache, partial
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
    """A jsonschema validator class that fills in defaults (the recipe from jsonschema's FAQ), refuses
    non-finite numbers and takes only true integers (not 4.0, not booleans) for "integer"."""
    validate_properties, validate_type = cls.VALIDATORS["properties"], cls.VALIDATORS["type"]

    def set_defaults(validator, properties, instance, schema_):  # noqa: ANN001
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = json.loads(json.dumps(sub["default"]))
        yield from validate_properties(validator, properties, instance, schema_)

    def finite_type(validator, types, instance, schema_):  # noqa: ANN001
        if isinstance(instance, float) and not math.isfinite(instance):
            yield jsonschema.ValidationError(f"{instance} is not a finite number")
            return
        yield from validate_type(validator, types, instance, schema_)

    checker = cls.TYPE_CHECKER.redefine(
        "integer", lambda _checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return jsonschema.validators.extend(cls, {"properties": set_defaults, "type": finite_type}, type_checker=checker)


_Validator = _validator_with_defaults(jsonschema.Draft202012Validator)


def _format_error(error: jsonschema.ValidationError, source: str, prefix: str) -> str:
    path, message = [*([prefix] if prefix else []), *map(str, error.absolute_path)], error.message
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = error.schema.get("properties", {})
        unknown = [key for key in error.instance if key not in known]
        path, message = [*path, str(unknown[0])], f"unknown key (known: {', '.join(known)})"
    elif error.validator == "required" and isinstance(error.instance, dict):
        missing = [key for key in error.validator_value if error.instance.get(key) is None] or error.validator_value
        path, message = [*path, str(missing[0])], "missing (required)"
    return f"{source}: {'.'.join(path) or '<top>'}: {message}"


def validate(config: Any, source: str = "config", subschema: dict | None = None, prefix: str = "") -> Any:
    """Validate ``config`` in place (defaults filled in) and return it; raise ConfigError naming the key
    (``prefix`` is the path of a section validated on its own)."""
    root = schema()
    target = root if subschema is None else {**subschema, "$defs": root["$defs"]}
    try:
        error = jsonschema.exceptions.best_match(_Validator(target).iter_errors(config))
    except RecursionError:
        raise ConfigError(f"{source}: {prefix or '<top>'}: nested too deeply") from None
    if error is not None:
        raise ConfigError(_format_error(error, source, prefix))
    for where, message in _rule_violations(config, prefix if subschema is not None else ""):
        raise ConfigError(f"{source}: {where}: {message}")
    return config


# ---- rules that span keys of one section (JSON Schema cannot compare two values) ----


def _schedule_violations(schedule: dict, where: str, steps_of: dict[str, int]) -> Iterator[tuple[str, str]]:
    """A schedule's iterations must fall inside every run it drives: ``steps_of`` maps the runs (as the
    user knows them) to their steps."""
    for what, steps in steps_of.items():
        for snapshot in schedule["snapshots"]:
            if snapshot >= steps:
                yield f"{where}.snapshots", f"{snapshot} is not before the last step of {what} ({steps} steps)"
        for point in schedule["lr_steps"]:
            if point >= 1 and (point != int(point) or point >= steps):
                problem = f"{point} is neither a fraction (below 1) nor an iteration of {what} ({steps} steps)"
                yield f"{where}.lr_steps", problem
        if 0 < schedule["warmup_steps"] >= steps:
            yield f"{where}.warmup_steps", f"{schedule['warmup_steps']} is not below the {steps} steps of {what}"


def _train_violations(train: dict, where: str) -> Iterator[tuple[str, str]]:
    steps_of = {f"the {init} detectors": detector_schedule(train, init)["steps"] for init in train["inits"]}
    yield from _schedule_violations(train["schedule"], f"{where}.schedule", steps_of)


def _pretrain_violations(pretrain: dict, where: str) -> Iterator[tuple[str, str]]:
    if "schedule" in pretrain:
        schedule = pretrain["schedule"]
        yield from _schedule_violations(schedule, f"{where}.schedule", {"pre-training": schedule["steps"]})


def _synthetic_violations(synthetic: dict, where: str) -> Iterator[tuple[str, str]]:
    if synthetic["min_objects"] > synthetic["max_objects"]:
        yield f"{where}.min_objects", f"{synthetic['min_objects']} exceeds max_objects ({synthetic['max_objects']})"
    low, high = synthetic["object_size"]
    if low > high:
        yield f"{where}.object_size", f"minimum {low} exceeds maximum {high}"


def fold_problem(folds: int, images: int) -> str | None:
    """Why ``folds`` folds of ``images`` images give no jackknife (0 folds: none asked for), or None."""
    if folds == 1:
        return "1 fold gives no jackknife; use 0 (no folds) or at least 2"
    if folds > images:
        return f"{folds} folds need at least {folds} images, got {images}"
    return None


def _covariance_violations(covariance: dict, where: str) -> Iterator[tuple[str, str]]:
    if problem := fold_problem(covariance["folds"], covariance["images"]):
        yield f"{where}.folds", problem


def _spectrum_violations(spectrum: dict, where: str) -> Iterator[tuple[str, str]]:
    first, last = spectrum["alpha_ranks"]
    if first > last:
        yield f"{where}.alpha_ranks", f"first rank {first} is after the last {last}"


_RULES = {
    "train": _train_violations,
    "pretrain": _pretrain_violations,
    "data.synthetic": _synthetic_violations,
    "covariance": _covariance_violations,
    "spectrum": _spectrum_violations,
}


def check_section(section: dict, path: str) -> None:
    """The cross-key rules of one section validated on its own (say, the library's spectrum settings)."""
    for where, message in _rule_violations(section, path):
        raise ConfigError(f"{where}: {message}")


def _rule_violations(config: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """The cross-key rules of every section inside ``config`` (a whole study, or the section at ``prefix``)."""
    for path, rule in _RULES.items():
        if prefix and path != prefix and not path.startswith(f"{prefix}."):
            continue
        node = config
        for name in path.removeprefix(prefix).strip(".").split(".") if path != prefix else ():
            node = node.get(name) if isinstance(node, dict) else None
        if isinstance(node, dict):
            yield from rule(node, path)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges, later keys override on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = first.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
            if seen is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen.line + 1})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None) or str(exc)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{' '.join(str(problem).split())}"


def parse_yaml(text: str, source: str, what: str = "config") -> Any:
    """Parse YAML (or JSON) text with the strict loader; errors are one ConfigError line naming ``source``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML ({_yaml_problem(exc)})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a {what}") from None


def _each_key_once(source: str, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    twice = next((key for position, key in enumerate(keys) if key in keys[:position]), None)
    if twice is not None:
        raise ConfigError(f"{source}: key {twice!r} given twice")
    return dict(pairs)


def parse_json(text: str, source: str) -> Any:
    """Parse JSON text given on the command line, refusing a key given twice in one object (the json module
    keeps the last silently); errors are one ConfigError line naming ``source``."""
    try:
        return json.loads(text, object_pairs_hook=partial(_each_key_once, source))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None


SPECIAL_FILE = "not a regular file or folder (a FIFO, device or socket)"


def is_special_file(path: Path) -> bool:
    """Whether ``path`` exists as neither a file nor a folder: reading a FIFO waits forever, /dev/zero fills the
    memory."""
    return path.exists() and not path.is_file() and not path.is_dir()


def read_yaml(path: str | Path, what: str = "config file") -> Any:
    """Parse a YAML (or JSON) file; a missing, binary or malformed file is a ConfigError naming it."""
    path = Path(path)
    if is_special_file(path):
        raise ConfigError(f"{path}: {SPECIAL_FILE}, not a {what}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a folder, not a {what}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a {what} is UTF-8 YAML or JSON)") from None
    return parse_yaml(text, str(path), what)


def widths_spec(path: str | Path, depths: list[int] | None = None) -> dict:
    """A widths spec file (``model.widths``), checked against the schema's ``$defs/widths_spec`` and, when
    given, ``model.depths`` (torch-free, so the workflow checks it at DAG start)."""
    data = validate(read_yaml(path, "widths spec"), str(path), subschema=schema()["$defs"]["widths_spec"])
    blocks = [len(stage["blocks"]) for stage in data["stages"]]
    if depths is not None and blocks != list(depths):
        raise ConfigError(f"{path}: blocks per stage {blocks} differ from model.depths {list(depths)}")
    return data


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
        node = schema()["properties"][section]["properties"][key]
        validate(value, "command line", subschema=node, prefix=dotted)  # blamed on the option, not the file
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
        given = _whole(parse_json(config_json, "--config-json"), "--config-json")
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
