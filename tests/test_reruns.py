"""Reruns follow every config key: a sweep generated from the schema against the finished smoke study.

For each key, the study file with only that key changed must make Snakemake plan exactly the jobs whose stage
reads the key's section (eigpipe/stages.py) and everything downstream of them, and nothing else. Keys that choose
which runs exist add or drop runs instead (RUN_CHOOSING), and three keys reach only some training runs (_narrowed).
The plans come from tests/dag_plans.py: Snakemake's own DAG and rerun decision, many studies per process.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from eigpipe import config as cfg
from eigpipe import study
from eigpipe.errors import ConfigError
from eigpipe.stages import STAGES
from tests.workflow_helpers import REPO, SMOKE, env

EVERY_KEY = ("model", "train", "data", "covariance")  # every key of these sections; one key of each other
RUN_CHOOSING = ("train.models", "train.inits", "train.seeds", "widths.enabled", "widths.measures", "imports")
PLANNED_ALWAYS = ("all",)  # the target rule: planned whenever anything is


def _smoke_data(split: str, kind: str) -> str:
    """The smoke data's copy outside results/smoke/ (a study may not read files in its own results)."""
    return f"coco-copy/{f'instances_{split}.json' if kind == 'annotations' else split}"


COCO_PATHS = {
    f"{split}_{kind}": _smoke_data(split, kind) for split in ("train", "val") for kind in ("annotations", "images")
}
# Values the generic change below cannot make (paths, layer names, a null with no natural first value), or whose
# generic change is not a valid study. Each entry: the changes to make, as {dotted key: value}.
OVERRIDES = {
    "data.source": {"data.source": "coco", "data.coco": COCO_PATHS},  # the smoke data, read as a COCO dataset
    "data.coco": {"data.coco": COCO_PATHS},
    "train.seeds": {"train.seeds": [0, 1, 2]},
    "train.steps_by_init.scratch": {"train.steps_by_init.scratch": 8},
    "covariance.layers": {"covariance.layers": ["default", "*body.conv1"]},
    "report.layers": {"report.layers": ["conv1"]},
    "widths.measures": {"widths.measures": ["intrinsic_dim", "relative_dim"]},
    # narrower than the smoke model, every width would be below widths.min_width: the budget could not be met
    "model.width_multiplier": {"model.width_multiplier": 0.125},
}


# ---- the sweep, generated from the schema ----


def _resolve(node: dict) -> dict:
    if "$ref" in node:
        return {
            **cfg.schema()["$defs"][node["$ref"].rsplit("/", 1)[1]],
            **{k: v for k, v in node.items() if k != "$ref"},
        }
    return node


def _get(config: dict, dotted: str):
    node = config
    for name in dotted.split("."):
        if not isinstance(node, dict) or name not in node:
            return None
        node = node[name]
    return node


def leaves(node: dict, path: str, config: dict):
    """Dotted keys of the schema under ``path``: an object with properties is walked into when the study has it
    (or the schema fills it in), otherwise it is one key."""
    node = _resolve(node)
    if "properties" in node and (_get(config, path) is not None or "default" in node):
        for name, sub in node["properties"].items():
            yield from leaves(sub, f"{path}.{name}" if path else name, config)
    else:
        yield path


def _changed_scalar(node: dict, value):
    node = _resolve(node)
    types = node.get("type", [])
    types = [types] if isinstance(types, str) else types
    if "enum" in node:
        return next(member for member in node["enum"] if member != value)
    if isinstance(value, bool) or "boolean" in types:
        return not value
    if value is None:
        if "integer" in types:
            return node.get("minimum", 1)
        if "number" in types:
            return 1.0
        if "array" in types:
            return [_changed_scalar(node["items"], None)] * node.get("minItems", 1)
        raise KeyError("no generic value")
    if isinstance(value, int):
        return value + 1 if value + 1 <= node.get("maximum", value + 1) else value - 1
    if isinstance(value, float):
        return value / 2 if value else node.get("maximum", 1) / 2
    if isinstance(value, str) and "pattern" in node:
        return f"{value}-changed"
    if isinstance(value, list):
        items = _resolve(node["items"])
        if "enum" in items:  # a set of choices: drop one, or add one
            if len(value) > node.get("minItems", 0):
                return value[1:]
            return [*value, next(m for m in items["enum"] if m not in value)]
        if value and not isinstance(value[-1], str):
            return [*value[:-1], _changed_scalar(items, value[-1])]
    raise KeyError("no generic value")


def sweep(base: dict, overrides: dict[str, dict]) -> dict[str, dict]:
    """{key: changes}: every key of EVERY_KEY's sections and RUN_CHOOSING, and the first key of each other section
    that a generic change (or OVERRIDES) turns into a valid study. The validated base supplies current values."""
    found = {}
    for section, node in cfg.schema()["properties"].items():
        covered = False
        for key in leaves(node, section, base):
            if covered and section not in EVERY_KEY and key not in RUN_CHOOSING:
                continue
            try:
                changes = overrides.get(key) or {key: _changed_scalar(_node_of(key), _get(base, key))}
                study.check(_with(base, changes), [])
            except (KeyError, ConfigError) as exc:
                if section in EVERY_KEY or key in RUN_CHOOSING:
                    raise AssertionError(f"{key}: no valid change ({exc}); add it to OVERRIDES") from None
                continue
            found[key], covered = changes, True
    return found


def _node_of(key: str) -> dict:
    node = {"properties": cfg.schema()["properties"]}
    for name in key.split("."):
        node = _resolve(node["properties"][name])
    return node


def _with(base: dict, changes: dict) -> dict:
    changed = copy.deepcopy(base)
    for dotted, value in changes.items():
        *parents, name = dotted.split(".")
        node = changed
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = copy.deepcopy(value)
    return changed


# ---- what each change must plan ----


def _run_of(job: dict) -> str | None:
    """The run a training or import job makes."""
    match = re.match(r"results/[^/]+/(?:train/([^/]+)/final|import/([^/]+))\.pt$", next(iter(job["outputs"]), ""))
    return match and (match.group(1) or match.group(2))


def _narrowed(key: str, base: dict, jobs: list[dict]) -> list[dict] | None:
    """The training jobs a key reaches when it reaches only some runs (None: every reader)."""
    own_steps = base["train"]["steps_by_init"]
    if key == "train.schedule.steps":  # the runs of every init without steps of its own
        return [j for j in jobs if _run_of(j) and _init_of(_run_of(j)) not in own_steps]
    if key.startswith("train.steps_by_init."):
        return [j for j in jobs if _run_of(j) and _init_of(_run_of(j)) == key.rsplit(".", 1)[1]]
    if key.startswith("data.synthetic"):  # the generator alone; the data it makes reaches the rest as an input
        return [j for j in jobs if j["rule"] == "synth_data"]
    if key == "data.coco" and base["data"]["source"] != "coco":  # unused: no job's slice of data holds it
        return []
    if key.startswith("data."):  # training's slice of data (source, strict, coco); synth_data's source is fixed
        return [j for j in jobs if j["rule"] in ("train_detector", "check_data")]
    if key == "train.init_gn_from_bn":  # how a pre-trained init may load: the pre-trained runs only
        return [
            j for j in jobs if _run_of(j) and j["rule"] == "train_detector" and _init_of(_run_of(j)) == "pretrained"
        ]
    return None


def _init_of(run: str) -> str:
    return "pretrained" if "-pretrained" in run else "scratch"  # derived runs train from scratch


def downstream(jobs: list[dict], start: list[int]) -> set[int]:
    producer = {out: i for i, job in enumerate(jobs) for out in job["outputs"]}
    consumers: dict[int, set[int]] = {}
    for i, job in enumerate(jobs):
        for path in job["inputs"]:
            if path in producer:
                consumers.setdefault(producer[path], set()).add(i)
    found, todo = set(), list(start)
    while todo:
        i = todo.pop()
        if i not in found:
            found.add(i)
            todo.extend(consumers.get(i, ()))
    return found


def expected(key: str, base: dict, jobs: list[dict], root: Path) -> set[int]:
    section = key.split(".")[0]
    new = [i for i, job in enumerate(jobs) if any(not (root / out).exists() for out in job["outputs"])]
    if key in RUN_CHOOSING:  # only new runs, and the report, which lists every run
        start = new + [i for i, job in enumerate(jobs) if job["rule"] == "report"]
    else:
        readers = _narrowed(key, base, jobs)
        if readers is None:
            readers = [job for job in jobs if job["stage"] and section in STAGES[job["stage"]].sections]
        start = new + [i for i, job in enumerate(jobs) if job in readers]
    return {i for i in downstream(jobs, start) if jobs[i]["rule"] not in PLANNED_ALWAYS}


def _describe(jobs: list[dict], indices: set[int]) -> list[str]:
    return sorted(f"{jobs[i]['rule']}:{(jobs[i]['outputs'] or ['-'])[0]}" for i in indices)


def plans(root: Path, configs: list[Path], pythonpath: Path, scratch: Path) -> dict[str, list[dict]]:
    """tests/dag_plans.py over the configs, split across the CPU cores (at most two processes)."""
    workers = max(1, min(2, os.cpu_count() or 1))
    chunks = [configs[i::workers] for i in range(workers)]
    procs = []
    for i, chunk in enumerate(chunks):
        out = scratch / f"plans-{i}.json"
        command = [sys.executable, str(REPO / "tests/dag_plans.py"), str(root), str(out), *map(str, chunk)]
        proc = subprocess.Popen(
            command, cwd=root, env=env(PYTHONPATH=str(pythonpath)), stderr=subprocess.PIPE, text=True
        )
        procs.append((out, proc))
    found = {}
    for out, proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        found.update(json.loads(out.read_text()))
    return found


@pytest.mark.slow
def test_every_config_key_reruns_exactly_the_jobs_that_read_it(smoke_run, frozen_src, tmp_path, monkeypatch):
    base = cfg.load(REPO / SMOKE)
    widths = tmp_path / "widths.yaml"  # a widths spec no job of the study makes (the smoke run's derived one)
    spec = yaml.safe_load((smoke_run / "results/smoke/widths/faster_rcnn-derived.yaml").read_text())
    widths.write_text(yaml.safe_dump({"stem": spec["stem"], "stages": spec["stages"]}))
    weights = tmp_path / "published.pth"  # planning an import needs only its file to exist
    weights.write_bytes(b"placeholder")
    published = {
        "tv-faster": {"preset": "torchvision/fasterrcnn_resnet50_fpn", "weights": str(weights), "init": "pretrained"}
    }
    monkeypatch.chdir(smoke_run)  # where the changed studies' relative paths resolve
    if not Path("coco-copy").exists():
        shutil.copytree("results/smoke/data/detection", "coco-copy")
    changes = sweep(
        base, {**OVERRIDES, "model.widths": {"model.widths": str(widths)}, "imports": {"imports": published}}
    )
    assert {key.split(".")[0] for key in changes} == set(cfg.schema()["properties"])  # every section
    assert set(RUN_CHOOSING) <= set(changes)
    raw = yaml.safe_load((REPO / SMOKE).read_text())
    configs = {key: tmp_path / f"{key}.yaml" for key in changes}
    for key, path in configs.items():
        path.write_text(yaml.safe_dump(_with(raw, changes[key])))
    (tmp_path / "unchanged.yaml").write_text(yaml.safe_dump(raw))
    start = time.monotonic()
    found = plans(smoke_run, [*configs.values(), tmp_path / "unchanged.yaml"], frozen_src, tmp_path)
    print(f"\nrerun sweep: {len(configs)} keys in {time.monotonic() - start:.1f} s")
    unchanged = found[str(tmp_path / "unchanged.yaml")]
    assert not [job for job in unchanged if job["planned"]]
    # an output no job or target reads, once missing, would silence its job's rerun triggers (README)
    read = {path for job in unchanged for path in job["inputs"]}
    assert not [out for job in unchanged for out in job["outputs"] if out not in read]
    wrong = []
    base_runs = {_run_of(job) for job in unchanged} - {None}
    for key, path in configs.items():
        jobs = found[str(path)]
        planned = {i for i, job in enumerate(jobs) if job["planned"] and job["rule"] not in PLANNED_ALWAYS}
        wanted = expected(key, base, jobs, smoke_run)
        if planned != wanted:
            wrong.append(
                f"{key}: not planned {_describe(jobs, wanted - planned)}, planned {_describe(jobs, planned - wanted)}"
            )
        if key in RUN_CHOOSING and {_run_of(job) for job in jobs} - {None} == base_runs:
            wrong.append(f"{key}: the runs did not change")
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_every_job_records_its_config_sections_as_params(smoke_run):
    """Snakemake compares only the params it recorded: each job's --config-json must be among them."""
    records = [json.loads(p.read_text()) for p in (smoke_run / ".snakemake/metadata").iterdir()]
    assert records
    seen = set()
    for record in records:
        stage = re.search(r"(?:^|\s)eigpipe ([a-z-]+)", record["code"]).group(1)
        params = [ast.literal_eval(p) for p in record["params"]]
        sections = [set(json.loads(p)) for p in params if isinstance(p, str) and p.startswith("{")]
        if STAGES[stage].sections:
            assert sections == [set(STAGES[stage].sections)], (record["rule"], record["params"])
        seen.add(record["rule"])
    assert {"train_detector", "pretrain", "covariance", "derive_widths", "evaluate"} <= seen
