"""Workflow behaviour: lint, the DAG, config validation, per-stage params and incremental reruns.

Every Snakemake call runs in a temporary working directory holding symlinks to workflow/ and config/,
so nothing is written to the repository's results/ or .snakemake/. The slow tests run the whole smoke
DAG (config/smoke.yaml) end to end.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from eigpipe import codehash
from eigpipe.stages import STAGES
from tests.workflow_helpers import (
    BASE_RUNS,
    DERIVED_RUNS,
    REPLICATE_RUNS,
    REPO,
    SMOKE,
    SNAKEMAKE,
    dry_run,
    env,
    failure,
    make_workdir,
    snakemake,
    write_config,
)

SMOKE_JOBS = {
    "synth_data": 1,
    "pretrain": 1,
    "train_detector": 12,  # {faster_rcnn, mask_rcnn} x {pretrained, scratch, derived} x seeds {0, 1}
    "evaluate": 12,
    # 4 runs x (snapshot 0 + final) + 2 derived (final) + the classifier + the 4 seed-1 replicates (final)
    "covariance": 15,
    "spectrum": 15,
    "dimensions": 7,
    "derive_widths": 2,
    "report": 1,
    "all": 1,
}
REPORT_FILES = [
    "eigenvalues.png",
    "dimensions.png",
    "dynamics.png",
    "spectra.csv",
    "evaluation.csv",
    "summary.csv",
    "summary.md",
    "widths.png",
    "comparisons.csv",
    "dimension_differences.csv",
]


# ---- helpers ----


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry-run; {} when there is nothing to be done."""
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:", 1)[1].splitlines()
    counts = {}
    for line in table[3:]:
        name, _, count = line.strip().partition(" ")
        if name == "total":
            return counts
        counts[name] = int(count)
    raise AssertionError(f"no job table in:\n{output[-2000:]}")


def job_inputs(output: str) -> list[tuple[str, str]]:
    """(rule, its input line) of every job in a dry-run."""
    found, rule = [], None
    for line in output.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            rule = m.group(1)
        elif (m := re.match(r"^\s+input: (.*)$", line)) and rule is not None:
            found.append((rule, m.group(1)))
    return found


def jobs(output: str) -> dict[tuple[str, str], str]:
    """(rule, outputs) -> shell command of every job in a dry-run with --printshellcmds."""
    found, rule, outputs = {}, None, ""
    for line in output.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            rule, outputs = m.group(1), ""
        elif m := re.match(r"^\s+output: (.*)$", line):
            outputs = m.group(1)
        elif line.startswith("Shell command: ") and rule is not None:
            command = line.removeprefix("Shell command: ").strip()
            if command != "None":  # rule all
                found[(rule, outputs)] = command
            rule = None
    return found


def config_json(command: str) -> dict | None:
    args = shlex.split(command)
    return json.loads(args[args.index("--config-json") + 1]) if "--config-json" in args else None


def stage_of(command: str) -> str:
    """The eigpipe stage a job's shell command runs."""
    return re.search(r"(?:^|\s)eigpipe ([a-z-]+)", command).group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return make_workdir(tmp_path_factory.mktemp("wf"))


@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory) -> Path:
    """config/coco.yaml with its placeholder paths pointing at empty stand-ins (DAG tests only)."""
    root = tmp_path_factory.mktemp("coco")
    for folder in ("train2017", "val2017"):
        (root / folder).mkdir()
    for name in ("train.json", "val.json", "R-50-GN.pkl"):
        (root / name).write_text("{}")
    return write_config(
        root / "coco.yaml",
        "config/coco.yaml",
        **{
            "data.coco.train_annotations": str(root / "train.json"),
            "data.coco.train_images": str(root / "train2017"),
            "data.coco.val_annotations": str(root / "val.json"),
            "data.coco.val_images": str(root / "val2017"),
            "pretrain.weights": str(root / "R-50-GN.pkl"),
        },
    )


@pytest.fixture(scope="module")
def smoke_dry_run(workdir) -> str:
    return dry_run(workdir, "--configfile", SMOKE)


# ---- fast: lint, DAG shape, validation, params ----


@pytest.mark.parametrize("config", [None, SMOKE, "coco"])
def test_lint_is_clean(workdir, fake_coco, config):
    args = [] if config is None else ["--configfile", str(fake_coco) if config == "coco" else config]
    proc = snakemake(workdir, "--lint", *args)
    assert proc.returncode == 0, proc.output
    assert "Lints for" not in proc.output, proc.output
    assert "Congratulations" in proc.output


def test_smoke_dag_has_the_expected_jobs(smoke_dry_run):
    assert job_counts(smoke_dry_run) == SMOKE_JOBS


def test_demo_dag_covers_every_snapshot(workdir):
    counts = job_counts(dry_run(workdir))  # config/config.yaml: snapshots 0, 100, 300, 500 + final
    assert counts["covariance"] == counts["spectrum"] == 2 * 5 + 1 + 1  # + the derived model's final
    assert counts["train_detector"] == 3 and counts["dimensions"] == 4 and counts["derive_widths"] == 1


def test_coco_dag_uses_the_dataset_and_weights_in_place(workdir, fake_coco):
    output = dry_run(workdir, "--configfile", str(fake_coco))
    counts = job_counts(output)
    assert "synth_data" not in counts and "pretrain" not in counts
    assert counts["check_data"] == 2
    assert counts["train_detector"] == 6  # {faster_rcnn, mask_rcnn} x {pretrained, scratch, derived}
    assert counts["derive_widths"] == 2 and counts["evaluate"] == 6
    snapshots = yaml.safe_load(fake_coco.read_text())["train"]["schedule"]["snapshots"]
    assert counts["covariance"] == 4 * (len(snapshots) + 1) + 2 + 1
    weights = yaml.safe_load(fake_coco.read_text())["pretrain"]["weights"]
    commands = jobs(output)
    (imported,) = [c for (rule, _), c in commands.items() if rule == "import_checkpoint"]  # Detectron's R-50-GN
    assert "--preset detectron2/R-50-GN" in imported and f"--weights {weights}" in imported
    classifier = [c for (rule, out), c in commands.items() if rule == "covariance" and "/classifier/" in out]
    assert len(classifier) == 1 and "--checkpoint results/coco/import/classifier.pt" in classifier[0]
    pretrained = [c for (rule, _), c in commands.items() if rule == "train_detector" and "pretrained:" in c]
    assert len(pretrained) == 2 and all("--init pretrained:results/coco/import/classifier.pt" in c for c in pretrained)
    # each job waits for its own split's check: editing the val split retrains nothing
    checks = {"train_detector": "train", "evaluate": "val", "covariance": "val"}
    for rule, inputs in job_inputs(output):
        if rule in checks:
            split = checks[rule]
            other = "val" if split == "train" else "train"
            assert f"checks/{split}.txt" in inputs and f"checks/{other}.txt" not in inputs, (rule, inputs)


def test_other_studies_inherit_nothing_from_the_demo(workdir, fake_coco, smoke_dry_run):
    """Every job's params hold the study file's own sections (schema defaults filled), never the demo's."""
    from eigpipe import config as cfg

    for output, path in [(smoke_dry_run, REPO / SMOKE), (dry_run(workdir, "--configfile", str(fake_coco)), fake_coco)]:
        study = cfg.load(path)
        for (rule, outputs), command in jobs(output).items():
            for name, section in (config_json(command) or {}).items():
                if name not in ("train", "model", "seed", "widths", "data"):  # narrowed to the job (tested below)
                    assert section == study[name], (path.name, rule, outputs, name)


def test_editing_the_demo_config_schedules_nothing_in_other_studies(tmp_path, fake_coco):
    root = make_workdir(tmp_path / "wd", copy_config=True)
    smoke = str(root / SMOKE)
    before = {study: jobs(dry_run(root, "--configfile", study)) for study in (smoke, str(fake_coco))}
    demo = root / "config/config.yaml"
    edited = yaml.safe_load(demo.read_text())
    edited["data"]["synthetic"]["rotate"] = True
    edited["train"]["schedule"]["lr"] = 0.5
    edited["spectrum"]["threshold"] = 0.1
    demo.write_text(yaml.safe_dump(edited))
    for study, commands in before.items():
        assert jobs(dry_run(root, "--configfile", study)) == commands, study


@pytest.mark.parametrize(
    "changes, named",
    [
        ({"train.schedule.lr": -1}, "train.schedule.lr: -1 is less than or equal to the minimum of 0"),
        ({"spectrum.threshold": float("nan")}, "spectrum.threshold: nan is not a finite number"),
        ({"train.schedule.snapshots": [0, 9]}, "train.schedule.snapshots: 9 is not before the last step"),
        ({"train.inits": ["pretrained"]}, "widths.source_init: scratch is not in train.inits"),  # derived runs
        ({"seed": "twice"}, "key 'seed' given twice"),
    ],
)
def test_a_bad_study_fails_at_dag_start_in_one_line(workdir, tmp_path, changes, named):
    """One case per kind of check (eigpipe.study; test_config.py has the instances of each class)."""
    bad = write_config(tmp_path / "bad.yaml", SMOKE, **{k: v for k, v in changes.items() if v != "twice"})
    if changes.get("seed") == "twice":
        bad.write_text(bad.read_text() + "seed: 1\n")
    proc = snakemake(workdir, "--dry-run", "--configfile", str(bad))
    assert proc.returncode != 0 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("Using workflow specific profile")]
    assert len(lines) == 1 and lines[0].startswith("eigpipe: error: "), proc.stderr[-3000:]
    assert named in lines[0] and f"error: {bad}: " in lines[0], lines[0]


def test_every_rule_runs_one_eigpipe_command(workdir, smoke_dry_run, fake_coco):
    rules = set(snakemake(workdir, "--list-rules").stdout.split()) - {"all"}
    commands = jobs(smoke_dry_run) | jobs(dry_run(workdir, "--configfile", str(fake_coco)))
    assert {rule for rule, _ in commands} == rules  # every rule is seen in the smoke or the coco DAG
    for command in commands.values():
        assert len(re.findall(r"(?:^|\s)eigpipe [a-z-]+", command)) == 1, command
        assert not re.search(r"&&|;|\|", command.split("--config-json")[0]), command


def test_stages_receive_only_their_config_sections(smoke_dry_run):
    """Every job passes exactly the sections the package's stage table names for its stage."""
    for (rule, outputs), command in jobs(smoke_dry_run).items():
        sections = config_json(command)
        wanted = set(STAGES[stage_of(command)].sections)
        assert (set(sections) if sections else set()) == wanted, (rule, outputs)


@pytest.mark.parametrize(
    "changes, changed",
    [
        ({"spectrum.threshold": 0.01}, {"spectrum"}),
        ({"report.layers": ["layer1.0.conv1"]}, {"report"}),
        ({"covariance.images": 4}, {"covariance"}),
        ({"evaluate.batch_size": 2}, {"evaluate"}),
        ({"train.schedule.lr": 0.02}, {"train_detector"}),
        ({"pretrain.schedule.lr": 0.05}, {"pretrain"}),
        ({"data.synthetic.val_images": 9}, {"synth_data"}),  # training reaches it through the data it reads
        # (without replicates: their names follow the study seed, <run>-s<seed> for the others)
        ({"seed": 1, "train.seeds": None}, {"synth_data", "pretrain", "train_detector", "covariance"}),
        ({"runtime.threads": 2}, {"pretrain", "train_detector", "evaluate", "covariance"}),
    ],
)
def test_a_config_change_reaches_only_the_stages_that_read_it(workdir, tmp_path, smoke_dry_run, changes, changed):
    # (Edited copies, not --config: Snakemake parses nested --config values as strings.)
    before = jobs(smoke_dry_run)
    if "seed" in changes:  # compared with the study without replicates
        before = jobs(
            dry_run(workdir, "--configfile", str(write_config(tmp_path / "b.yaml", SMOKE, **{"train.seeds": None})))
        )
    after = jobs(dry_run(workdir, "--configfile", str(write_config(tmp_path / "c.yaml", SMOKE, **changes))))
    assert after.keys() == before.keys()
    assert {job[0] for job in before if before[job] != after[job]} == changed


def test_adding_a_model_or_a_seed_leaves_the_existing_runs_alone(workdir, tmp_path):
    one = {"train.models": ["faster_rcnn"], "train.seeds": None}
    before = jobs(dry_run(workdir, "--configfile", str(write_config(tmp_path / "a.yaml", SMOKE, **one))))
    for change, trained in [
        ({"train.models": ["faster_rcnn", "mask_rcnn"], "train.seeds": None}, 6),
        ({"train.models": ["faster_rcnn"], "train.seeds": [0, 1]}, 6),
    ]:
        after = jobs(dry_run(workdir, "--configfile", str(write_config(tmp_path / "c.yaml", SMOKE, **change))))
        assert sum(rule == "train_detector" for rule, _ in after) == trained
        changed = {job[0] for job in before if before[job] != after[job]}
        assert changed == {"report"}, change  # only the report gains inputs
    seeds = jobs(dry_run(workdir, "--configfile", str(tmp_path / "c.yaml")))
    replicates = [out for (rule, out) in seeds if rule == "train_detector" and "-s1/" in out]
    assert len(replicates) == 3 and all(config_json(seeds[("train_detector", out)])["seed"] == 1 for out in replicates)
    # the replicates of the configured-width runs get their final spectra (the spread over seeds), no snapshots
    measured = sorted(out for (rule, out) in seeds if rule == "covariance" and "-s1/" in out)
    assert measured == [
        f"results/smoke/covariance/faster_rcnn-{init}-s1/final.zarr" for init in ("pretrained", "scratch")
    ]


def test_a_widths_knob_changes_only_the_derivation(workdir, tmp_path, smoke_dry_run):
    before = jobs(smoke_dry_run)
    after = jobs(
        dry_run(workdir, "--configfile", str(write_config(tmp_path / "c.yaml", SMOKE, **{"widths.multiple": 2})))
    )
    assert {job for job in before if before[job] != after[job]} == {job for job in before if job[0] == "derive_widths"}
    derived = [cmd for (rule, out), cmd in after.items() if rule == "train_detector" and "derived" in out]
    assert len(derived) == 4  # both detectors, both seeds: the seed-1 retrains read the same widths
    assert all(config_json(cmd)["model"]["widths"].endswith("-derived.yaml") for cmd in derived)


def test_the_synthetic_generators_keys_reach_only_what_reads_its_data(workdir, tmp_path, fake_coco):
    """In a COCO study, data.synthetic feeds the classifier's data only (when it is trained here): no detector job's
    params hold it; synth_data's params hold nothing but it (and the seed)."""
    pretrain = yaml.safe_load((REPO / SMOKE).read_text())["pretrain"]  # the classifier trained on synthetic crops
    synthetic = {"data.synthetic.rotate": True, "pretrain": pretrain}
    base = jobs(dry_run(workdir, "--configfile", str(write_config(tmp_path / "a.yaml", str(fake_coco), **synthetic))))
    edited = write_config(tmp_path / "b.yaml", str(fake_coco), **synthetic, **{"data.synthetic.image_size": 96})
    after = jobs(dry_run(workdir, "--configfile", str(edited)))
    assert {rule for rule, _ in (job for job in base if base[job] != after[job])} == {"synth_data"}
    (synth,) = [cmd for (rule, _), cmd in after.items() if rule == "synth_data"]
    assert set(config_json(synth)) == {"data", "seed"} and set(config_json(synth)["data"]) == {"source", "synthetic"}
    trains = [cmd for (rule, _), cmd in after.items() if rule == "train_detector"]
    assert trains and all(set(config_json(cmd)["data"]) == {"source", "strict", "coco"} for cmd in trains)


def test_steps_of_one_init_change_only_its_runs(workdir, tmp_path, smoke_dry_run):
    before = jobs(smoke_dry_run)
    steps = yaml.safe_load((REPO / SMOKE).read_text())["train"]["schedule"]["steps"]
    # (both inits stated: --configfile merges onto config/config.yaml's steps_by_init)
    longer = {"pretrained": steps, "scratch": steps + 2}
    longer_cfg = write_config(tmp_path / "c.yaml", SMOKE, **{"train.steps_by_init": longer})
    after = jobs(dry_run(workdir, "--configfile", str(longer_cfg)))
    changed = {job for job in before if before[job] != after[job]}
    assert {rule for rule, _ in changed} == {"train_detector"}
    # the scratch baselines and the derived retrains (the scratch schedule) of both detectors, for both seeds
    wanted = DERIVED_RUNS + [r for r in BASE_RUNS if "scratch" in r]
    assert sorted(out.split("/")[3] for _, out in changed) == sorted(wanted + [f"{r}-s1" for r in wanted])
    assert all(config_json(after[job])["train"]["schedule"]["steps"] == steps + 2 for job in changed)


def test_several_gpus_run_training_under_torchrun(workdir):
    commands = jobs(dry_run(workdir, "--configfile", SMOKE, "--set-resources", "train_detector:gpu=4"))
    for (rule, _), command in commands.items():
        if rule == "train_detector":
            assert command.startswith("torchrun --standalone --nproc_per_node 4 --no-python eigpipe train"), command
        else:
            assert command.startswith("eigpipe "), command


def test_slurm_profile_requests_gpus_the_plugin_way(workdir):
    profile = yaml.safe_load((REPO / "workflow/profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert profile["rerun-incomplete"] is True
    assert profile["slurm-init-seconds-before-status-checks"] > 0
    assert {"slurm_partition", "mem_mb", "runtime"} <= set(profile["default-resources"])
    rules = set(snakemake(workdir, "--list-rules").stdout.split())
    assert set(profile["set-resources"]) <= rules
    for rule in ("pretrain", "train_detector", "evaluate", "covariance"):
        resources = profile["set-resources"][rule]
        assert resources["gpu"] >= 1 and resources["cpus_per_gpu"] >= 1, rule
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        assert not re.search(r"--gres|--gpus|--cpus-per-gpu", str(resources.get("slurm_extra", "")))


def test_default_profile_makes_reruns_after_a_kill_work():
    profile = yaml.safe_load((REPO / "workflow/profiles/default/config.yaml").read_text())
    assert profile["rerun-incomplete"] is True and profile["keep-going"] is False
    assert profile["cores"] >= 1 and profile["printshellcmds"] is True


# ---- fast: the code hash helper ----


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "eigpipe" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "eigpipe"


def test_source_files_follow_eigpipe_imports(tmp_path):
    pkg = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "report.py": "import numpy\nfrom eigpipe import store\n\ndef f():\n    from .sub.deep import g\n",
            "store.py": "from . import errors\n",
            "errors.py": "",
            "sub/__init__.py": "",
            "sub/deep.py": "from ..errors import E\nfrom eigpipe.sub import other\n",
            "sub/other.py": "",
            "unused.py": "",
        },
    )
    found = {p.relative_to(pkg).as_posix() for p in codehash.source_files(pkg, "eigpipe.report")}
    assert found == {
        "__init__.py",
        "report.py",
        "store.py",
        "errors.py",
        "sub/__init__.py",
        "sub/deep.py",
        "sub/other.py",
    }


def test_editing_a_module_changes_only_the_hashes_of_stages_that_run_it(tmp_path):
    pkg = tmp_path / "eigpipe"
    shutil.copytree(codehash.PACKAGE_ROOT, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = {stage: codehash.code_hash(stage, pkg) for stage in STAGES}
    with (pkg / "report.py").open("a") as handle:
        handle.write("\n# an edit\n")
    with (pkg / "spectral" / "accumulator.py").open("a") as handle:
        handle.write("\n# an edit\n")
    codehash.code_hash.cache_clear()
    after = {stage: codehash.code_hash(stage, pkg) for stage in STAGES}
    assert {stage for stage in before if before[stage] != after[stage]} == {"report", "covariance", "analyze"}


def test_the_command_line_and_the_numeric_libraries_are_in_every_stage_hash(tmp_path, monkeypatch):
    """cli.py parses every stage's arguments (defaults, overrides); another torch gives other bits."""
    pkg = tmp_path / "eigpipe"
    shutil.copytree(codehash.PACKAGE_ROOT, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    codehash.code_hash.cache_clear()
    before = {stage: codehash.code_hash(stage, pkg) for stage in STAGES}
    with (pkg / "cli.py").open("a") as handle:
        handle.write("\n# an edit\n")
    codehash.code_hash.cache_clear()
    edited = {stage: codehash.code_hash(stage, pkg) for stage in STAGES}
    monkeypatch.setattr(codehash, "software", lambda: {"torch": "0.0"})
    codehash.code_hash.cache_clear()
    upgraded = {stage: codehash.code_hash(stage, pkg) for stage in STAGES}
    codehash.code_hash.cache_clear()
    assert all(before[s] != edited[s] != upgraded[s] for s in STAGES)


# ---- slow: the smoke study end to end ----


def expected_outputs(root: Path) -> list[Path]:
    r = root / "results/smoke"
    files = [r / "data", r / "pretrain/final.pt", r / "pretrain/metrics.jsonl"]
    for run in BASE_RUNS + DERIVED_RUNS + REPLICATE_RUNS:
        files += [r / f"train/{run}/final.pt", r / f"train/{run}/metrics.jsonl", r / f"eval/{run}.json"]
        files += [r / f"train/{run}/snapshots/{i}.pt" for i in (0,)] + [r / f"eval/{run}.matches.npz"]
    files += [r / f"widths/{run}.yaml" for run in DERIVED_RUNS]
    analysed = [(run, ["0", "final"]) for run in BASE_RUNS] + [(run, ["final"]) for run in DERIVED_RUNS]
    files += [r / f"dimensions/{run}.parquet" for run, _ in [*analysed, ("classifier", [])]]
    replicates = [(f"{run}-s1", ["final"]) for run in BASE_RUNS]  # the spread over seeds of the final spectra
    for run, iterations in [*analysed, ("classifier", ["final"]), *replicates]:
        for it in iterations:
            files += [
                r / f"covariance/{run}/{it}.zarr",
                r / f"spectrum/{run}/{it}.parquet",
                r / f"spectrum/{run}/{it}.zarr",
            ]
    files += [r / "report" / name for name in REPORT_FILES]
    return files


def _not_empty(path: Path) -> bool:
    if path.is_dir():
        return any(p.is_file() and p.stat().st_size > 0 for p in path.rglob("*"))
    return path.is_file() and path.stat().st_size > 0


@pytest.mark.slow
def test_smoke_study_writes_every_output(smoke_run):
    missing = [str(p.relative_to(smoke_run)) for p in expected_outputs(smoke_run) if not _not_empty(p)]
    assert not missing


@pytest.mark.slow
def test_second_run_has_nothing_to_do(smoke_run, frozen_src):
    output = dry_run(smoke_run, "--configfile", SMOKE, extra_env={"PYTHONPATH": str(frozen_src)})
    assert job_counts(output) == {}


@pytest.mark.slow
def test_threshold_change_reruns_only_the_analysis(smoke_run, frozen_src, tmp_path):
    edited = write_config(tmp_path / "c.yaml", SMOKE, **{"spectrum.threshold": 0.01})
    output = dry_run(smoke_run, "--configfile", str(edited), extra_env={"PYTHONPATH": str(frozen_src)})
    # the derived specs come from the scratch runs' dimensions: those are rederived and retrained
    counts = job_counts(output)
    assert counts["spectrum"] == 15 and counts["dimensions"] == 7 and counts["report"] == 1
    # the derived retrains of both seeds
    assert counts["train_detector"] == 4 and counts["derive_widths"] == 2 and "pretrain" not in counts


@pytest.mark.slow
def test_widths_change_retrains_only_the_derived_models(smoke_run, frozen_src, tmp_path):
    edited = write_config(tmp_path / "c.yaml", SMOKE, **{"widths.multiple": 2})
    output = dry_run(smoke_run, "--configfile", str(edited), extra_env={"PYTHONPATH": str(frozen_src)})
    assert job_counts(output) == {
        "derive_widths": 2,
        "train_detector": 4,  # both seeds' derived retrains
        "evaluate": 4,
        "covariance": 2,  # the study seed's derived models (final spectra)
        "spectrum": 2,
        "dimensions": 2,
        "report": 1,
        "all": 1,
    }
    scheduled = {out for (rule, out) in jobs(output) if rule in ("train_detector", "covariance")}
    assert all("derived" in out for out in scheduled)


@pytest.mark.slow
def test_the_comparison_table_has_every_model(smoke_run):
    import pandas as pd

    summary = pd.read_csv(smoke_run / "results/smoke/report/summary.csv").set_index("model")
    assert sorted(summary.index) == sorted(BASE_RUNS + DERIVED_RUNS)
    assert summary.loc["mask_rcnn-derived", "delta_segm_AP"] == pytest.approx(
        summary.loc["mask_rcnn-derived", "segm_AP"] - summary.loc["mask_rcnn-scratch", "segm_AP"]
    )
    for run in DERIVED_RUNS:
        spec = yaml.safe_load((smoke_run / f"results/smoke/widths/{run}.yaml").read_text())
        assert summary.loc[run, "body_params"] == spec["derivation"]["detector"]["derived"]["body_params"]
        assert spec["derivation"]["body"]["ratio"]["macs"] <= 1.0


@pytest.mark.slow
def test_the_two_seed_summary_gives_intervals_and_verdicts(smoke_run):
    """Seeds 0 and 1 with folds of images: every AP and AP difference has its intervals over seeds, images and
    both; summary.md ends with one verdict per comparison; d/C differences come with intervals and the spectra
    with jackknife standard errors."""
    import pandas as pd

    report = smoke_run / "results/smoke/report"
    summary = pd.read_csv(report / "summary.csv").set_index("model")
    for column in ("AP_sd", "AP_seeds_low", "AP_seeds_high", "AP_images_low", "AP_images_high", "AP_low", "AP_high"):
        assert summary[column].notna().all(), column
    assert (summary["AP_seeds_low"] <= summary["AP"]).all() and (summary["AP"] <= summary["AP_seeds_high"]).all()
    compared = summary.drop(index=["faster_rcnn-scratch", "mask_rcnn-scratch"])
    assert set(compared["delta_AP_pairing"]) == {"paired by seed"} and compared["delta_AP_low"].notna().all()
    assert summary.loc["mask_rcnn-derived", "delta_segm_AP_high"] >= summary.loc["mask_rcnn-derived", "delta_segm_AP"]
    pairs = pd.read_csv(report / "comparisons.csv")
    assert len(pairs) == 3 * 2 + 3  # three pairs per detector, and Mask R-CNN's segm AP too
    verdicts = (report / "summary.md").read_text().rstrip("\n").splitlines()[-len(pairs) :]
    assert [line.removeprefix("- ") for line in verdicts] == list(pairs["verdict"])
    assert all(
        re.search(r"\[95% CI [-+]\d\.\d{3}, [-+]\d\.\d{3}\] over 2 seeds x 8 images: the interval", v) for v in verdicts
    )
    diffs = pd.read_csv(report / "dimension_differences.csv")
    assert set(diffs["detector"]) == {"faster_rcnn", "mask_rcnn"} and set(diffs["stage"]) == {"s1", "s2", "s3", "s4"}
    assert set(diffs["kind"]) == {"conv1", "conv2", "conv3", "downsample", "block output"}
    assert (
        (diffs["folds"] == 2).all() and diffs["seeds"].eq("2/2").all() and diffs["pairing"].eq("paired by seed").all()
    )
    spectra = pd.read_parquet(smoke_run / "results/smoke/spectrum/faster_rcnn-scratch/final.parquet")
    assert (spectra["folds"] == 2).all() and spectra["intrinsic_dim_se"].notna().all()


@pytest.mark.slow
def test_report_code_edit_reruns_only_the_report(smoke_run, frozen_src, tmp_path):
    shutil.copytree(frozen_src / "eigpipe", tmp_path / "eigpipe")
    with (tmp_path / "eigpipe/report.py").open("a") as handle:
        handle.write("\n# an edit\n")
    output = dry_run(smoke_run, "--configfile", SMOKE, extra_env={"PYTHONPATH": str(tmp_path)})
    assert job_counts(output) == {"report": 1, "all": 1}


@pytest.mark.slow
def test_html_report_includes_the_registered_results(smoke_run, frozen_src):
    html = smoke_run / "report.html"
    proc = snakemake(smoke_run, "--configfile", SMOKE, "--report", str(html), extra_env={"PYTHONPATH": str(frozen_src)})
    assert proc.returncode == 0, proc.output[-3000:]
    for name in REPORT_FILES:
        assert f"Adding {name}" in proc.output
    assert "eigenspectrum" in html.read_text()


@pytest.mark.slow
def test_coco_source_checks_each_split_before_training(smoke_run, frozen_src, tmp_path):
    # The smoke run's synthetic dataset, read in place as a COCO-format dataset.
    data = smoke_run / "results/smoke/data/detection"
    paths = {
        f"data.coco.{split}_{kind}": str(data / (f"instances_{split}.json" if kind == "annotations" else split))
        for split in ("train", "val")
        for kind in ("annotations", "images")
    }
    paths.update({"study": "cc", "data.source": "coco", "data.strict": True})
    coco = write_config(tmp_path / "c.yaml", SMOKE, **paths)
    targets = ["results/cc/checks/train.txt", "results/cc/checks/val.txt"]
    root = make_workdir(tmp_path / "cc")
    args = [*targets, "--cores", "2", "--configfile", str(coco)]
    proc = snakemake(root, *args, extra_env={"PYTHONPATH": str(frozen_src)})
    assert proc.returncode == 0, proc.output[-3000:]
    assert "--strict" in proc.output
    assert "16 images" in (root / targets[0]).read_text() and "8 images" in (root / targets[1]).read_text()


def _kill_tree(proc: subprocess.Popen) -> None:
    parent = psutil.Process(proc.pid)
    for child in parent.children(recursive=True):
        child.kill()
    parent.kill()
    proc.wait()


@pytest.mark.slow
def test_killed_training_resumes_on_rerun(tmp_path, frozen_src):
    root = make_workdir(tmp_path / "killed")
    # Longer training than the smoke default, so the kill lands mid-training, after a resume state.
    longer = {"train.schedule.steps": 200, "train.schedule.checkpoint_every": 20}
    runs = ["faster_rcnn-pretrained", "faster_rcnn-scratch"]
    targets = [f"results/smoke/train/{run}/final.pt" for run in runs]  # the rest is the smoke run's
    config = ["--configfile", str(write_config(tmp_path / "c.yaml", SMOKE, **longer))]
    args = [*targets, "--cores", "2", *config]  # targets first: --configfile takes several values
    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(
            [SNAKEMAKE, *args], cwd=root, env=env(PYTHONPATH=str(frozen_src)), stdout=log, stderr=subprocess.STDOUT
        )
    train = root / "results/smoke/train"
    deadline = time.monotonic() + 300
    while not list(train.glob("*/resume/state.pt")):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                _kill_tree(proc)
            pytest.fail(f"no resume state before the run ended:\n{(tmp_path / 'first.log').read_text()[-3000:]}")
        time.sleep(0.1)
    _kill_tree(proc)  # SIGKILL, jobs included: no clean-up, like a lost node
    interrupted = [run for run in runs if (train / run / "resume/state.pt").exists()]
    assert not any((train / run / "final.pt").exists() for run in interrupted)

    unlock = snakemake(root, "--unlock", *config)  # the lock the killed Snakemake left
    assert unlock.returncode == 0, unlock.output[-2000:]
    # No --rerun-incomplete here: the default profile sets it, which is what a user gets.
    rerun = snakemake(root, *args, extra_env={"PYTHONPATH": str(frozen_src)})
    assert rerun.returncode == 0, failure(rerun, root)
    for run in interrupted:
        log = (root / f"results/smoke/logs/train_detector/{run}.log").read_text()
        assert re.search(r"resuming .* from iteration [1-9]", log), log[-2000:]
        assert _not_empty(train / run / "final.pt") and _not_empty(train / run / "snapshots/0.pt")
        assert len((train / run / "metrics.jsonl").read_text().splitlines()) >= 200
