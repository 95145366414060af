"""A real two-node Slurm cluster on loopback for the tests in this folder (tests/slurm/cluster.sh).

The session fixture starts munged, slurmctld and two slurmd once, hands tests a small client
(`sbatch`, wait for a job, read its record), and at the end stops exactly the daemons it started,
by PID, and checks that they are gone. Tests skip, saying why, only where Slurm is not installed
or cannot run its daemons (not root); CI installs it (.ci/run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO_ROOT / "tests" / "slurm" / "cluster.sh"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
INSTALL_HINT = "apt-get install slurmctld slurmd slurm-client munge (.ci/run installs them)"
# The daemons live in /usr/sbin, which a non-login PATH may lack.
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


@dataclass
class Job:
    """The parts of `scontrol show job` the tests look at."""

    id: str
    state: str
    exit_code: str  # "status:signal", as Slurm prints it
    restarts: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


class SlurmCluster:
    """Client side of the test cluster: everything goes through SLURM_CONF=<dir>/slurm.conf."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.conf = directory / "slurm.conf"
        self.env = {
            **os.environ,
            "PATH": SBIN_PATH,
            "SLURM_CONF": str(self.conf),
            # Jobs run this checkout's code with this interpreter, whatever is installed.
            "UORA_PYTHON": sys.executable,
            "UORA_HOME": str(REPO_ROOT),
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }

    def run(self, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(args), env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60, **kwargs
        )

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        done = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        assert done.returncode == 0, f"sbatch failed: {done.stderr}"
        return done.stdout.strip().split(";")[0]

    def record(self, job_id: str) -> dict[str, str]:
        done = self.run("scontrol", "show", "job", "-o", job_id)
        assert done.returncode == 0, done.stderr
        return dict(re.findall(r"(\w+)=(\S*)", done.stdout))

    def job(self, job_id: str) -> Job:
        rec = self.record(job_id)
        return Job(job_id, rec["JobState"], rec["ExitCode"], int(rec["Restarts"]), Path(rec["StdOut"]))

    def wait(self, job_id: str, timeout: float = 120) -> Job:
        """Poll until the job has left the queue for good (a requeue puts it back: keep waiting)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if job.state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return job
            time.sleep(0.5)
        self.run("scancel", job_id)
        job = self.job(job_id)
        raise AssertionError(f"job {job_id} still {job.state} after {timeout} s; log:\n{job.log_text()}")

    def pids(self) -> dict[str, int]:
        path = self.dir / "pids"
        if not path.is_file():
            return {}
        return {name: int(pid) for name, pid in (line.split() for line in path.read_text().splitlines())}


def _alive(pid: int) -> bool:
    """Running and not a zombie (an exited daemon whose parent has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory):
    missing = [name for name in SLURM_BINARIES if shutil.which(name, path=SBIN_PATH) is None]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} not found): {INSTALL_HINT}")
    if os.geteuid() != 0:
        pytest.skip(
            "the test cluster runs slurmctld/slurmd as SlurmUser=root: run the tests as root (as CI does)"
        )
    directory = tmp_path_factory.mktemp("slurm-cluster")
    started = subprocess.run(
        ["bash", str(CLUSTER_SH), "start", str(directory)],
        env={**os.environ, "PATH": SBIN_PATH}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if started.returncode != 0:
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((directory / "log").glob("*"))
        )
        pytest.fail(f"test cluster did not start: {started.stderr}\n{logs}")
    cluster = SlurmCluster(directory)
    pids = cluster.pids()
    assert set(pids) == {"munged", "slurmctld", "slurmd-n1", "slurmd-n2"}
    try:
        yield cluster
    finally:
        stopped = subprocess.run(
            ["bash", str(CLUSTER_SH), "stop", str(directory)],
            env={**os.environ, "PATH": SBIN_PATH}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        survivors = {name: pid for name, pid in pids.items() if _alive(pid)}
        assert stopped.returncode == 0, stopped.stderr
        assert not survivors, f"daemons still running after cluster.sh stop: {survivors}"
