r"""Start and stop throwaway clusters on this machine: SLURM and Ray.

    python scripts/clusters.py slurm start DIR   # munged, slurmctld, slurmd; prints export SLURM_CONF=...
    python scripts/clusters.py slurm stop DIR
    python scripts/clusters.py ray start DIR     # a head and one worker node; prints the address
    python scripts/clusters.py ray stop DIR

SLURM: one node named after `hostname`, from Debian's packages (apt-get install
slurm-wlm munge), with no systemd, cgroups or accounting database: every daemon runs in
the background with its key, configuration, spool, state and logs under DIR and its own
free ports. Point sbatch, squeue and scontrol at it with the SLURM_CONF it prints.
Ray: `ray start` for a head and one worker node on 127.0.0.1 (pip install ray), with a
fast health check, so a lost node is noticed in about 3 s; their process ids under DIR,
Ray's temporary files and logs in a new folder /tmp/rsst-ray-XXXXXXXX (Ray's unix sockets
need a path that short), whose path DIR/ray_tmp holds. Each `stop` ends the
processes that its `start` wrote to DIR/pids.json, by id (never `ray stop`, which ends
every Ray process of the machine), and removes Ray's temporary folder.

Exit codes: 0 done, 1 a cluster did not start (one line saying why), 2 bad usage.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Optional


class ClusterError(RuntimeError):
    """A cluster could not start; the message says what is missing."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_file(root: pathlib.Path) -> pathlib.Path:
    return root / "pids.json"


def _remember(root: pathlib.Path, name: str, pid: int) -> None:
    path = _pids_file(root)
    pids = json.loads(path.read_text()) if path.exists() else {}
    pids[name] = pid
    path.write_text(json.dumps(pids))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pids(pids, wait: float = 3.0) -> None:
    """SIGTERM each process (and its process group where it leads one), SIGKILL what is
    left after ``wait`` seconds."""
    pids = [p for p in pids if p and _alive(p)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                if os.getpgid(pid) == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + wait
        while time.time() < deadline and any(_alive(p) for p in pids):
            try:
                os.waitpid(-1, os.WNOHANG)  # reap our own children
            except ChildProcessError:
                pass
            time.sleep(0.1)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


def stop(root) -> None:
    """End every process a ``start`` recorded under ``root``."""
    root = pathlib.Path(root).resolve()
    path = _pids_file(root)
    pids = list(json.loads(path.read_text()).values()) if path.exists() else []
    # Ray's nodes: what carries their mark now, with the agents and workers below it.
    pids += marked_pids(f"{root}/head") + marked_pids(f"{root}/worker")
    stop_pids(with_descendants(pids))
    if path.exists():
        path.unlink()
    tmp = root / "ray_tmp"
    if tmp.exists():
        shutil.rmtree(tmp.read_text().strip(), ignore_errors=True)
        tmp.unlink()


def _spawn(root: pathlib.Path, name: str, argv, env=None) -> subprocess.Popen:
    log = open(root / f"{name}.out", "ab")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    _remember(root, name, proc.pid)
    return proc


def _wait_for(what: str, check, timeout: float, logs=()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.2)
    tail = ""
    for log in logs:
        try:
            tail += f"\n--- {log}\n" + "\n".join(pathlib.Path(log).read_text(errors="replace").splitlines()[-10:])
        except OSError:
            pass
    raise ClusterError(f"{what} did not happen within {timeout:.0f} s{tail}")


# --------------------------------------------------------------------------- SLURM

SLURM_PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "sinfo", "scontrol",
                  "scancel")


def slurm_missing() -> Optional[str]:
    """Why no SLURM cluster can start here (None when everything is installed)."""
    lacking = [p for p in SLURM_PROGRAMS if not shutil.which(p, path=os.environ.get("PATH", "")
                                                          + ":/usr/sbin:/sbin")]
    if lacking:
        return f"{', '.join(lacking)} not found; apt-get install slurm-wlm munge"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1024


def slurm_config(root: pathlib.Path, ctl_port: int, node_port: int, socket_path: pathlib.Path) -> str:
    host = socket.gethostname()
    user = "root" if os.geteuid() == 0 else os.environ.get("USER", str(os.geteuid()))
    return "\n".join([
        "ClusterName=rsst",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctl_port}",
        f"SlurmdPort={node_port}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # A requeued job waits for its credential to expire before it starts again.
        f"AuthInfo=socket={socket_path},cred_expire=5",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=1,bf_interval=1",
        "JobRequeue=1",
        "ReturnToService=2",
        "MinJobAge=600",
        "KillWait=5",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "Waittime=0",
        (f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} "
         f"RealMemory={_memory_mb()} State=UNKNOWN"),
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def start_slurm(root) -> dict:
    """munged, slurmctld and slurmd under ``root`` (created); the environment the SLURM
    commands need ({"SLURM_CONF": ...}). Raises ClusterError with the reason."""
    missing = slurm_missing()
    if missing:
        raise ClusterError(missing)
    root = pathlib.Path(root).resolve()
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    sock = root / "munge" / "munge.socket"
    munged = [_sbin("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
              f"--pid-file={root / 'munge' / 'munged.pid'}", f"--log-file={root / 'munge' / 'munged.log'}",
              f"--seed-file={root / 'munge' / 'munged.seed'}"]
    _spawn(root, "munged", munged)
    _wait_for("munged's socket", sock.exists, 15, [root / "munged.out"])
    conf = root / "slurm.conf"
    conf.write_text(slurm_config(root, free_port(), free_port(), sock))
    env = dict(os.environ, SLURM_CONF=str(conf))
    _spawn(root, "slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(conf)], env=env)
    _spawn(root, "slurmd", [_sbin("slurmd"), "-D", "-f", str(conf)], env=env)

    def idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")
    _wait_for("the SLURM node reporting idle", idle, 60,
              [root / "slurmctld.log", root / "slurmd.log", root / "slurmctld.out", root / "slurmd.out"])
    return {"SLURM_CONF": str(conf)}


# --------------------------------------------------------------------------- Ray

def ray_missing() -> Optional[str]:
    if not _ray_cli():
        return "the ray command is not installed; pip install 'rsst-jax[cluster]'"
    return None


def _ray_cli() -> Optional[str]:
    beside = pathlib.Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else shutil.which("ray")


RAY_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
              "RAY_health_check_initial_delay_ms": "1000", "RAY_USAGE_STATS_ENABLED": "0"}


MARK = "RSST_CLUSTER_NODE"  # set in a node's environment, inherited by all its processes


def marked_pids(mark: str, below: bool = True) -> list[int]:
    """The processes whose environment has ``RSST_CLUSTER_NODE=mark`` (``ray start``
    daemonizes: its processes are no children of ours), with those ``below`` them."""
    needle = f"{MARK}={mark}".encode()
    pids = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environ:
            pids.append(int(entry.name))
    return with_descendants(pids) if below else pids


def with_descendants(pids) -> list[int]:
    """``pids`` and every living process below them (a raylet's agents and workers)."""
    children: dict = {}
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, []))
    return found


def start_ray(root, env: Optional[dict] = None, worker_cpus: int = 1, head_cpus: int = 1) -> dict:
    """A Ray head and one worker node on 127.0.0.1, their files under ``root``; returns
    {"address": "127.0.0.1:PORT", "head": [pids], "worker": [pids]}. ``env`` is the
    environment the nodes (and so every task) start with."""
    missing = ray_missing()
    if missing:
        raise ClusterError(missing)
    root = pathlib.Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = dict(env if env is not None else os.environ, **RAY_HEALTH)
    port = free_port()
    # Ray's unix sockets live under its temp dir: a path short enough for them.
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="rsst-ray-", dir="/tmp"))
    (root / "ray_tmp").write_text(str(tmp))
    common = ["--disable-usage-stats", "--num-gpus=0", "--node-ip-address=127.0.0.1"]
    def node(name: str, *args) -> list[int]:
        """``ray start *args`` as node ``name``; the ids of the processes it left running."""
        done = subprocess.run([_ray_cli(), "start", *args, *common],
                              env=dict(env, **{MARK: f"{root}/{name}"}), capture_output=True,
                              text=True, timeout=120)
        pids = marked_pids(f"{root}/{name}")
        for i, pid in enumerate(pids):
            _remember(root, f"ray-{name}-{i}", pid)
        if done.returncode != 0:
            stop(root)
            raise ClusterError(f"ray start ({name}) failed: "
                               + (done.stderr or done.stdout)[-2000:])
        return pids

    head_pids = node("head", "--head", f"--port={port}", "--include-dashboard=false",
                     f"--dashboard-port={free_port()}", f"--temp-dir={tmp}",
                     f"--num-cpus={head_cpus}", "--resources={\"head\": 1}")
    address = f"127.0.0.1:{port}"
    worker_pids = node("worker", f"--address={address}", f"--num-cpus={worker_cpus}",
                       "--resources={\"worker\": 1}")
    return {"address": address, "head": head_pids, "worker": worker_pids}


def kill_ray_node(root, node: str = "worker") -> list[int]:
    """SIGKILL the Ray processes ``start_ray`` started for ``node`` (its raylet among
    them): the node is lost as if its machine died; the workers below the raylet notice
    and end. Returns the pids killed."""
    pids = marked_pids(f"{pathlib.Path(root).resolve()}/{node}", below=False)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/clusters.py",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\n\n", 1)[1])
    p.add_argument("kind", choices=("slurm", "ray"), help="which cluster")
    p.add_argument("action", choices=("start", "stop"), help="start it, or stop what its "
                   "start began")
    p.add_argument("dir", metavar="DIR", help="the cluster's folder (created by start)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.action == "stop":
        stop(args.dir)
        return 0
    try:
        if args.kind == "slurm":
            print(f"export SLURM_CONF={start_slurm(args.dir)['SLURM_CONF']}")
        else:
            print(f"ray address: {start_ray(args.dir)['address']}")
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
