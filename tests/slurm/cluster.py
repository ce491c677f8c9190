"""A single-node SLURM on loopback, for the workflow's SLURM tests (Debian slurm-wlm 22.05 + munge).

    python tests/slurm/cluster.py up DIR     # install if missing, configure, start, wait for an idle node
    python tests/slurm/cluster.py down DIR   # stop the daemons `up DIR` started (by pid), unlink the config

Needs root and apt-get (to install the packages when they are missing); no systemd. Everything the
cluster writes (config, pid files, state, spool, logs) lives in DIR; the only files outside it are the
symlink /etc/slurm/slurm.conf -> DIR/slurm.conf (the plugin's job step strips SLURM_* variables, so
SLURM_CONF cannot stand in for it) and, when the packages were missing, what apt installs. munged runs
with its own key and socket in DIR (slurm.conf's AuthInfo), so a system munged is neither used nor
disturbed. Job status without accounting: no slurmdbd, so Snakemake's slurm profile
must set `slurm-status-command: squeue` (MinJobAge=300 keeps finished jobs visible to squeue); with
the default (sacct) the plugin loses the jobs and waits forever. See tests/slurm/README.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurm-wlm", "munge"]  # slurmctld, slurmd, slurm-client (+ basic plugins), munged
BINARIES = ["slurmctld", "slurmd", "sinfo", "squeue", "sbatch", "scontrol", "scancel", "munged", "munge", "unmunge"]
CONF_LINK = Path("/etc/slurm/slurm.conf")
LOCK = Path("/tmp/eigpipe-slurm.lock")
PORTS = (6817, 6818)  # slurmctld, slurmd (loopback only)
OVERSUBSCRIBE = 4  # CPUs the node claims per CPU it has (see node_line)


class ClusterError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[slurm] {message}", file=sys.stderr, flush=True)


def _with_sbin() -> None:
    """The daemons live in /usr/sbin, which a non-login PATH may lack."""
    path = os.environ.get("PATH", "").split(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([*path, *(d for d in ("/usr/sbin", "/sbin") if d not in path)])


def missing_requirements() -> str | None:
    """Why this machine cannot host the cluster at all (None: it can). Only 'not root' and 'no apt'
    count: anything else that goes wrong during `up` is a failure, not a reason to skip."""
    _with_sbin()
    if os.geteuid() != 0:
        return "a local SLURM needs root (it installs packages and runs slurmctld/slurmd as root)"
    if not all(shutil.which(b) for b in BINARIES) and not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get to install them"
    return None


def _run(*args: str, timeout: float = 60, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


# ---- install ----


def install() -> float:
    """apt-get install the packages when a binary is missing, with services kept from starting.
    Returns the seconds it took (0 when nothing was missing)."""
    if all(shutil.which(b) for b in BINARIES):
        return 0.0
    start = time.monotonic()
    log(f"installing {' '.join(PACKAGES)} with apt-get")
    policy = Path("/usr/sbin/policy-rc.d")
    saved = policy.read_bytes() if policy.exists() else None
    policy.write_text("#!/bin/sh\n# eigpipe tests/slurm/cluster.py: no service starts during install\nexit 101\n")
    policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        apt = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        proc = subprocess.run(apt, capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:  # a stale package index: update once, then try again
            _run("apt-get", "update", "-q", timeout=600, env=env)
            _run(*apt, timeout=600, env=env)
    finally:
        if saved is None:
            policy.unlink()
        else:
            policy.write_bytes(saved)
            policy.chmod(0o755)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        raise ClusterError(f"still missing after apt-get install: {missing}")
    return time.monotonic() - start


# ---- configuration ----


def node_line(hostname: str, oversubscribe: int) -> str:
    """The node from `slurmd -C`, on loopback, RealMemory a bit under the machine's, and `oversubscribe`
    times its CPUs (slurmd accepts the claim with SlurmdParameters=config_overrides): the workflow's jobs
    are short and one-threaded, and running the ready ones together hides the plugin's status back-off."""
    first = _run("slurmd", "-C").stdout.splitlines()[0]  # NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105
    fields = dict(item.split("=", 1) for item in first.split())
    cpus = int(fields["CPUs"]) * oversubscribe
    memory = int(fields["RealMemory"])
    memory = max(memory - min(2048, memory // 10), 256)
    return (
        f"NodeName={hostname} NodeAddr=127.0.0.1 CPUs={cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={cpus}"
        f" ThreadsPerCore=1 RealMemory={memory} State=UNKNOWN"
    )


def slurm_conf(root: Path, hostname: str, oversubscribe: int = OVERSUBSCRIBE) -> str:
    return f"""\
# Written by tests/slurm/cluster.py: a single-node SLURM on loopback for the eigpipe tests.
ClusterName=eigpipe
SlurmctldHost={hostname}(127.0.0.1)
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
SlurmctldPort={PORTS[0]}
SlurmdPort={PORTS[1]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
SlurmUser=root
SlurmdUser=root
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups here. pgid, not linuxproc: linuxproc loses a process whose parent died (Snakemake's job step
# handles SIGTERM, outlives its shell and stayed behind after scancel/requeue); pgid kills the group.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
SchedulerType=sched/backfill
ReturnToService=2
# finished jobs stay visible to squeue: the plugin's status command without accounting
MinJobAge=300
# no accounting (no slurmdbd): Snakemake's profile must say slurm-status-command: squeue
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# jobs are not requeueable unless submitted with --requeue (the profile's slurm-requeue: true)
JobRequeue=0
# seconds from SIGTERM to SIGKILL on scancel/requeue: the job stays COMPLETING (unseen by status checks) meanwhile
KillWait=2
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
SlurmdParameters=config_overrides
{node_line(hostname, oversubscribe)}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


# ---- daemons ----


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None, name: str) -> bool:
    """pid runs a program called `name` (a pid file can outlive its process, and pids are reused)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return comm == name and state != "Z"  # a zombie has exited


def _daemon(*args: str) -> None:
    """Start a self-daemonising program detached from our session and pipes."""
    proc = subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise ClusterError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")


def _munge_works(sock: Path) -> bool:
    try:
        cred = subprocess.run(["munge", "-n", "-S", str(sock)], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        check = subprocess.run(["unmunge", "-S", str(sock)], input=cred.stdout, capture_output=True, timeout=10)
        return check.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _wait(what: str, ready, timeout: float, logs: list[Path] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            tails = "".join(f"\n--- {p}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}{tails}")
        time.sleep(0.2)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def node_state() -> str:
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=10)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def up(root: Path, timeout: float = 60) -> dict:
    """Install, configure and start the cluster in `root`; returns timings (seconds) and what it started."""
    root = root.resolve()
    start = time.monotonic()
    _with_sbin()
    installed = install()
    if CONF_LINK.is_symlink() or CONF_LINK.exists():
        other = CONF_LINK.resolve().parent
        if not CONF_LINK.is_symlink():
            raise ClusterError(f"{CONF_LINK} is a real file, not a link from a test cluster: refusing to replace it")
        if other != root and any(_alive(_pid(other / f"{d}.pid"), d) for d in ("slurmctld", "slurmd")):
            raise ClusterError(f"another test cluster is running from {other} (stop it: cluster.py down {other})")
    for port in PORTS:
        if not _port_free(port):
            raise ClusterError(f"port {port} on 127.0.0.1 is in use (another slurmctld/slurmd?)")
    for folder in ("state", "spool", "log"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    hostname = socket.gethostname().split(".")[0]
    (root / "slurm.conf").write_text(slurm_conf(root, hostname))
    CONF_LINK.parent.mkdir(parents=True, exist_ok=True)
    if CONF_LINK.is_symlink():
        CONF_LINK.unlink()
    CONF_LINK.symlink_to(root / "slurm.conf")
    started = {}

    def record(name: str, pid_file: Path) -> None:  # what `down` may stop, written as each one starts
        started[name] = str(pid_file)
        (root / "started.json").write_text(json.dumps(started))

    # munged on a socket of its own, with a fresh key (run as root: munge's user could not reach into a
    # private DIR such as pytest's tmp folders); slurm.conf's AuthInfo points slurm at that socket.
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o700, exist_ok=True)
    if len(str(munge_dir / "munge.socket")) > 100:
        raise ClusterError(f"{root}: too long a path for munge's socket (at most 100 characters)")
    key = munge_dir / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(128))
        key.chmod(0o400)
    record("munged", munge_dir / "munged.pid")
    _daemon(
        "munged",
        "--force",
        f"--socket={munge_dir}/munge.socket",
        f"--key-file={key}",
        f"--pid-file={munge_dir}/munged.pid",
        f"--log-file={munge_dir}/munged.log",
        f"--seed-file={munge_dir}/seed",
    )
    _wait("munged", lambda: _munge_works(munge_dir / "munge.socket"), 20, [munge_dir / "munged.log"])

    # -i: ignore state files (a fresh state folder anyway)
    record("slurmctld", root / "slurmctld.pid")
    _daemon("slurmctld", "-i")
    _wait(
        "slurmctld",
        lambda: _run("scontrol", "ping", check=False).returncode == 0,
        timeout,
        [root / "log/slurmctld.log"],
    )
    record("slurmd", root / "slurmd.pid")
    _daemon("slurmd")
    _wait(
        "the node to be idle",
        lambda: node_state() == "idle",
        timeout,
        [root / "log/slurmctld.log", root / "log/slurmd.log"],
    )
    seconds = {"install_s": round(installed, 1), "up_s": round(time.monotonic() - start, 1)}
    log(f"cluster up in {seconds['up_s']} s (install {seconds['install_s']} s); config {CONF_LINK} -> {root}")
    return {**seconds, "started": started}


def down(root: Path, timeout: float = 20) -> list[str]:
    """Stop the daemons `up(root)` started, by the pids in their pid files; remove the config link."""
    root = root.resolve()
    record = root / "started.json"
    started = json.loads(record.read_text()) if record.exists() else {}
    stopped = []
    if started.get("slurmctld") and _alive(_pid(Path(started["slurmctld"])), "slurmctld"):
        # our cluster's jobs only: cancel them and let their slurmstepd finish before slurmd stops
        subprocess.run(["scancel", "--partition", "debug"], capture_output=True, timeout=20)
        deadline = time.monotonic() + timeout
        active = ["squeue", "-h", "-t", "RUNNING,COMPLETING,CONFIGURING"]
        while time.monotonic() < deadline and _run(*active, check=False, timeout=10).stdout.strip():
            time.sleep(0.2)
    pids = {name: _pid(Path(started[name])) for name in ("slurmd", "slurmctld", "munged") if name in started}
    pids = {name: pid for name, pid in pids.items() if _alive(pid, name)}
    for pid in pids.values():  # all at once
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(pid, name) for name, pid in pids.items()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for name, pid in pids.items():
        if _alive(pid, name):
            os.kill(pid, signal.SIGKILL)
        stopped.append(f"{name} ({pid})")
    if CONF_LINK.is_symlink() and CONF_LINK.resolve() == root / "slurm.conf":
        CONF_LINK.unlink()
    record.unlink(missing_ok=True)
    log(f"stopped {', '.join(stopped) or 'nothing'}")
    return stopped


@contextlib.contextmanager
def exclusive(timeout: float = 1800):
    """Hold the machine-wide cluster lock: two test sessions on one machine take turns."""
    with LOCK.open("w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"{LOCK} held by another session for {timeout:.0f} s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    command, root = argv[0], Path(argv[1])
    if command == "up":
        if reason := missing_requirements():
            print(f"cannot start SLURM here: {reason}", file=sys.stderr)
            return 3
        root.mkdir(parents=True, exist_ok=True)
        try:
            print(json.dumps(up(root)))
        except ClusterError as error:
            print(error, file=sys.stderr)
            down(root)
            return 1
    else:
        down(root)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
