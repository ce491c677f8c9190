"""Command line: argument parsing only. Each subcommand is a stage of ``eigpipe.stages.STAGES``."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import NoReturn

from eigpipe.errors import EigpipeError, one_line
from eigpipe.outputs import refuse_inputs
from eigpipe.stages import STAGES, Arg, Stage, path_argument

DESCRIPTION = """\
eigpipe measures the eigenspectra of neural-network features: for each chosen layer, the covariance of its
features over a set of images (the second moment and mean, in float64), then its eigenvalues and dimension
measures (the count above a threshold, delve's saturation, participation ratio, RankMe, alpha-ReQ, ...).
It reproduces "Understanding the Effects of Pre-Training for Object Detectors via Eigenspectrum" (Shinya et
al., ICCVW 2019) as a Snakemake workflow, and analyses any PyTorch model from your own code (eigpipe.track)."""

EPILOG = """\
where to start:
  a classifier on your images   eigpipe analyze --model torchvision:resnet50 --weights resnet50.pth \\
                                    --images photos/ --layers 'Conv2d:layer*' --out resnet50.zarr
                                eigpipe spectrum resnet50.zarr --out resnet50.csv
  your own model, in Python     with eigpipe.track(model, layers=["Conv2d:*"]) as tracker: ...
                                tracker.spectra(); tracker.save("run.zarr")
  the whole study               make demo   (or: snakemake --cores 2 --configfile config/config.yaml)

the workflow, stage by stage (each a subcommand; `eigpipe <command> --help`):
  covariance / analyze / eigpipe.track -> STORE.zarr (per-layer second moment and mean)
  spectrum STORE -> table of eigenvalue measures per layer (+ eigenvalues)
  dimensions (tables of one run's snapshots) -> the dynamics; report -> plots and tables
  widths -> layer widths derived from a run's eigenspectrum (then train them from scratch)

The README explains every measure and option."""


class _Parser(argparse.ArgumentParser):
    """A bad argument is one line, as every other bad input (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_stage(sub: argparse._SubParsersAction, stage: Stage) -> None:
    parser = sub.add_parser(stage.name, help=stage.help, description=stage.help)
    if stage.sections:
        group = parser.add_mutually_exclusive_group(required=stage.config_required)
        group.add_argument("--config", "--model-config", type=path_argument, help="a whole study config YAML")
        group.add_argument("--config-json", help="only the sections this stage reads, as JSON (rules pass this)")
    for arg in stage.args:
        parser.add_argument(*arg.flags, **arg.options)
    parser.set_defaults(stage=stage)


def build_parser() -> argparse.ArgumentParser:
    from eigpipe import __version__

    parser = _Parser(
        prog="eigpipe", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"eigpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for stage in STAGES.values():
        _add_stage(sub, stage)
    return parser


def _dest(arg: Arg) -> str:
    """The attribute argparse stores an argument under."""
    if "dest" in arg.options:
        return arg.options["dest"]
    first = next((f for f in arg.flags if f.startswith("--")), arg.flags[0])
    return first.lstrip("-").replace("-", "_")


def run_stage(stage: Stage, args: argparse.Namespace) -> None:
    """Validate the stage's config sections (with any command-line overrides) and call its entry function."""
    from eigpipe import config

    overrides, paths = {}, {}
    for arg in stage.args:
        value = getattr(args, _dest(arg))
        if arg.override is not None:
            overrides[arg.override] = value
        else:
            paths[_dest(arg)] = value
    cfg = {}
    if stage.sections:
        for output in _outputs(stage, args):  # the stages check their other inputs themselves
            refuse_inputs(output, [args.config])
        given = args.config_json if args.config or args.config_json else "{}"  # {}: the schema's defaults
        cfg = config.sections(args.config, given, stage.sections, overrides)
    stage.function()(cfg, **paths)


def _outputs(stage: Stage, args: argparse.Namespace) -> list[Path]:
    """The output paths given to the stage."""
    return [getattr(args, _dest(arg)) for arg in stage.args if arg.output and getattr(args, _dest(arg)) is not None]


def _likely_path(stage: Stage, args: argparse.Namespace) -> str:
    """For an OS error that names no file: the stage's output, or else the first path it was given."""
    paths = [getattr(args, _dest(arg)) for arg in stage.args if arg.options.get("type") is path_argument]
    found = _outputs(stage, args) or [p for p in paths if p]
    first = found[0] if found else "input/output"
    return str(first[0] if isinstance(first, list) else first)


class Terminated(BaseException):
    """SIGTERM (Snakemake or SLURM cancelling the job), raised so that publications clean up as on Ctrl-C."""


def _child_ended(signum: int, frame: FrameType | None) -> None:
    """SIGCHLD while a terminated stage cleans up: its children are ending, as they should."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the stage runs, SIGTERM raises Terminated in this process; the previous handler is restored after.
    Signal handlers can only be set in the main thread; elsewhere (eigpipe.cli.main called from a thread of the
    user's) SIGTERM keeps its handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != owner:  # a forked worker (data loading, image checks) dies quietly, as before
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not break off the cleanup
        # The job's loader workers got the same signal (scancel and Snakemake signal the process group); torch's
        # SIGCHLD handler would report each of them as a failure while the stage cleans up. A handler that does
        # nothing, not SIG_DFL: a SIGCHLD already caught but not yet handled would find no Python handler and print
        # "Signal 17 ignored due to race condition" with a traceback (seen on a loaded machine).
        replaced.append(signal.signal(signal.SIGCHLD, _child_ended))
        raise Terminated

    replaced: list = []  # the SIGCHLD handler that a SIGTERM set aside
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        for child_handler in replaced:
            signal.signal(signal.SIGCHLD, child_handler if child_handler is not None else signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _sigterm_raises():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the chosen stage; every failure the user can act on is one line on stderr and a non-zero status."""
    try:
        run_stage(args.stage, args)
    except EigpipeError as exc:
        print(one_line(f"eigpipe {args.command}: error: {exc}"), file=sys.stderr)
        return 1
    except OSError as exc:  # disk full, permissions, read-only folders: the path and the reason, in one line
        where = exc.filename if exc.filename is not None else _likely_path(args.stage, args)
        print(one_line(f"eigpipe {args.command}: error: {where}: {exc.strerror or exc}"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"eigpipe {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"eigpipe {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
