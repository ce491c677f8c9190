"""What Snakemake plans for each of many study files against one results tree, in one process.

    python tests/dag_plans.py WORKDIR OUT.json CONFIG...

For every config it builds the DAG as `snakemake --summary` does (through Snakemake's API) and writes, per job,
its rule, outputs, inputs, the eigpipe stage its command runs, and whether Snakemake would run it (the job has
a reason to run: the decision `snakemake -n` prints, and the summary's "update pending"). One process amortises
Snakemake's start-up, about two thirds of a dry run, so a sweep over every config key stays fast. The DAG is
read from the workflow object the API built (`WorkflowApi._workflow.dag`), after the summary's public call.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
from pathlib import Path

from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, Quietness, ResourceSettings


def plan(workdir: Path, configfile: Path) -> list[dict]:
    """Every job of the study's DAG: rule, stage, outputs, inputs, and whether it is planned to run."""
    quiet = OutputSettings(quiet={Quietness.ALL}, enable_file_logging=False)  # no log file per study
    with contextlib.redirect_stdout(io.StringIO()), SnakemakeApi(quiet) as api:
        workflow = api.workflow(
            ResourceSettings(cores=1),
            ConfigSettings(configfiles=[configfile]),
            snakefile=workdir / "workflow" / "Snakefile",
            workdir=workdir,
        )
        workflow.dag(DAGSettings()).summary()
        dag = workflow._workflow.dag
        return [
            {
                "rule": job.rule.name,
                "stage": (re.search(r"(?:^|\s)eigpipe ([a-z-]+)", job.rule.shellcmd or "") or [None, None])[1],
                "outputs": sorted(map(str, job.output)),
                "inputs": sorted(map(str, job.input)),
                "planned": bool(dag.reason(job)),
            }
            for job in dag.jobs
        ]


def main(workdir: str, out: str, *configs: str) -> None:
    plans = {config: plan(Path(workdir).resolve(), Path(config).resolve()) for config in configs}
    Path(out).write_text(json.dumps(plans))


if __name__ == "__main__":
    main(*sys.argv[1:])
