"""Where and how a stage computes: device, threads, determinism, seeds, torchrun detection."""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from eigpipe import gpus

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True only under torchrun (or torch.distributed.launch): SLURM_PROCID alone does not count.

    Snakemake's slurm executor runs each job inside an allocation where SLURM_PROCID is set, so the
    torchvision-reference habit of treating it as "distributed" would hang a single-process job.
    """
    return all(name in os.environ for name in TORCHRUN_VARS)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(cfg: dict, seed: int) -> Runtime:
    """Apply the runtime section (threads, determinism, device) and seeds; under torchrun, join the group.

    ``cfg["threads"]`` is what the job was given (rules pass Snakemake's ``{threads}`` as ``--threads``, which
    overrides ``runtime.threads``). On CUDA, a process not launched by torchrun holds a GPU no other eigpipe
    process holds (see eigpipe.gpus); under torchrun each rank takes its LOCAL_RANK."""
    torch.set_num_threads(cfg["threads"])
    if cfg["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    wanted = cfg["device"]
    use_cuda = torch.cuda.is_available() if wanted == "auto" else wanted == "cuda"
    if wanted == "cuda" and not torch.cuda.is_available():
        from eigpipe.errors import EigpipeError

        raise EigpipeError("runtime.device: cuda was asked for but no CUDA device is available")
    rank, world, local = 0, 1, 0
    if launched_by_torchrun():
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ["LOCAL_RANK"])
    set_float32_precision("tf32" if cfg["tf32"] else "ieee")
    if use_cuda:
        # torchrun's ranks own the GPUs of their launch; a lone process claims a free GPU of its own (eigpipe.gpus)
        index = local if launched_by_torchrun() else gpus.claim_visible()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
        print(f"eigpipe: running on {describe_gpu(index)}", file=sys.stderr, flush=True)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    seed_everything(seed + rank)
    return Runtime(device=device, rank=rank, world_size=world, local_rank=local)


def set_float32_precision(precision: str) -> None:
    """float32 convolutions and matmuls on CUDA in ``precision`` (ieee | tf32). PyTorch's own default is TF32 for
    cuDNN convolutions and IEEE for matmuls; eigpipe sets both from runtime.tf32 (IEEE unless asked), so a study
    computes the same numbers on a CPU and a GPU up to rounding order."""
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def describe_gpu(index: int) -> str:
    """``cuda:<index> (<name>, <uuid>)``: the GPU a job runs on, as its log says."""
    name = torch.cuda.get_device_name(index)
    return f"cuda:{index} ({name}, {gpus.visible_gpus()[index]})"


def teardown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def progress(**options: Any) -> Iterator[Any]:
    """A tqdm progress bar on stderr (``options`` are tqdm's; update it by hand: a bar iterating for you closes
    itself, leaving its line, before this sees the error). On an error it is cleared, not left as a line of its
    own, so that the error stays the one line a failed stage prints."""
    from tqdm import tqdm

    bar = tqdm(file=sys.stderr, **options)
    try:
        yield bar
    except BaseException:
        bar.leave = False
        raise
    finally:
        bar.close()
