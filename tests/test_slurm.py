"""The Slurm launch scripts (slurm/), checked statically and run under a real Slurm.

Static: every script passes `bash -n` and shellcheck, and the recipe scripts differ only in
their header and recipe name. Cluster: a private single-node Slurm (Debian's slurmctld and
slurmd as ordinary processes, auth/none, loopback, config/state/logs under a temp folder,
torn down by pid afterwards) takes every script's header (`sbatch --test-only`), runs an 8B
script's recipe as a dry run, and runs the debug recipe through slurm/train_debug.sh and
slurm/launch.sh on two CPU ranks: a job trains and checkpoints, a second job resumes it, and
a job whose ranks are killed mid-run is restarted by torchrun and still finishes. The
cluster tests skip when Slurm is missing (`bash scripts/install_slurm.sh` installs it).
About 2 minutes here.

    .venv/bin/python -m pytest tests/test_slurm.py
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import read_metrics, running, worker_pids
from dist_utils import free_port

from titan.checkpoint import list_steps

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "slurm"
# Every sbatch script and the recipe it trains (train_configs/<recipe>.toml).
RECIPE_SCRIPTS = {
    "train_primate_8B_131k.sh": "primate_8b_131k",
    "train_synthetic_8B_131k.sh": "synthetic_8b_131k",
    "train_synthetic_primate_8B_131k.sh": "synthetic_primate_8b_131k",
    "train_lang_primate_8B_131k.sh": "lang_primate_8b_131k",
    "train_debug.sh": "debug_model",
}
SHELL_FILES = [
    SLURM_DIR / "launch.sh",
    SLURM_DIR / "site.env.example",
    ROOT / "scripts" / "install_slurm.sh",
    *(SLURM_DIR / name for name in RECIPE_SCRIPTS),
]
SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo", "scancel")
JOB_TIMEOUT_S = 300


# ----------------------------------------------------------------------------- static checks


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: p.name)
def test_scripts_parse(path: Path) -> None:
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (bash scripts/install_slurm.sh)",
)
def test_shellcheck_clean() -> None:
    result = subprocess.run(
        ["shellcheck", *map(str, SHELL_FILES)], capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _split_script(path: Path) -> tuple[list[str], list[str]]:
    """(header, body): the leading comment and #SBATCH lines, then everything after."""
    lines = path.read_text().splitlines()
    n = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    return lines[:n], [line for line in lines[n:] if line.strip()]


def test_recipe_scripts_differ_only_in_header_and_recipe() -> None:
    bodies = {}
    for name, recipe in RECIPE_SCRIPTS.items():
        path = SLURM_DIR / name
        assert (ROOT / "train_configs" / f"{recipe}.toml").is_file(), f"{name}: no {recipe}.toml"
        header, body = _split_script(path)
        sbatch = [line for line in header if line.startswith("#SBATCH")]
        assert "#SBATCH --ntasks-per-node=1" in sbatch, f"{name}: one srun task per node"
        assert any(line.startswith("#SBATCH --output=slurm/logs/") for line in sbatch), name
        assert sum(f" {recipe} " in line for line in body) == 1, f"{name}: {body}"
        bodies[name] = [line.replace(f" {recipe} ", " RECIPE ") for line in body]
    first = next(iter(bodies.values()))
    for name, body in bodies.items():
        assert body == first, f"{name} differs from the others beyond header and recipe: {body}"
    assert first == ['exec bash "${TITAN_DIR:-$SLURM_SUBMIT_DIR}/slurm/launch.sh" RECIPE "$@"']


def test_warning_signal_is_sized_from_the_recipe() -> None:
    """Every script asks Slurm for USR1 early enough for the step in progress and one full
    save of its recipe on its nodes (titan.lifecycle.stop_lead_seconds)."""
    from titan.config import load_config
    from titan.lifecycle import stop_lead_seconds

    for name, recipe in RECIPE_SCRIPTS.items():
        header, _ = _split_script(SLURM_DIR / name)
        nodes = int(next(x for x in header if x.startswith("#SBATCH --nodes=")).split("=")[1])
        signal_line = next(x for x in header if x.startswith("#SBATCH --signal="))
        lead = int(re.fullmatch(r"#SBATCH --signal=B:USR1@(\d+)", signal_line).group(1))
        cfg = load_config([f"--job.config_file=train_configs/{recipe}.toml"])
        assert lead >= stop_lead_seconds(cfg, nodes), (name, lead)


# ----------------------------------------------------------------------------- the cluster


def _pids_with_env(key: str, value: str) -> list[int]:
    """Processes whose initial environment holds key=value (this cluster's daemons and jobs)."""
    needle = f"{key}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    env: dict[str, str]

    def cmd(
        self, *args: str, check: bool = True, env: dict | None = None, **kwargs
    ) -> subprocess.CompletedProcess:
        result = subprocess.run(
            args,
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=60,
            **kwargs,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {result.stdout}{result.stderr}")
        return result

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*"))
        )

    def submit(
        self, script: str, *args: str, log: Path, sbatch_args: tuple = (), env: dict | None = None
    ) -> int:
        """sbatch a slurm/ script from the repo root, as a user would; returns the job id."""
        out = self.cmd(
            "sbatch",
            "--parsable",
            f"--output={log}",
            *sbatch_args,
            f"slurm/{script}",
            *args,
            cwd=ROOT,
            env=env,
        ).stdout
        return int(out.strip().split(";")[0])

    def state(self, job_id: int) -> dict[str, str]:
        line = self.cmd("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(f.split("=", 1) for f in line.split() if "=" in f)

    def wait(self, job_id: int, log: Path, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state["JobState"] not in (
                "PENDING",
                "CONFIGURING",
                "RUNNING",
                "COMPLETING",
                "REQUEUED",
            ):
                return state
            time.sleep(1)
        self.cmd("scancel", str(job_id), check=False)
        text = log.read_text() if log.exists() else "(no job log)"
        pytest.fail(
            f"job {job_id} still {state['JobState']} after {timeout} s; "
            f"log:\n{text[-4000:]}\n{self.logs()}"
        )


def _write_conf(root: Path, node: str) -> Path:
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(f"""\
ClusterName=titantest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
CommunicationParameters=NoInAddrAny
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
ReturnToService=2
SchedulerParameters=sched_interval=1,bf_interval=1
NodeName={node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _stop(pids: list[int], sig: int, grace_s: float) -> None:
    """Signal these processes, then wait up to grace_s for them to exit."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(map(running, pids)):
        time.sleep(0.2)


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"Slurm is not installed (missing {', '.join(missing)}); "
            "bash scripts/install_slurm.sh installs it"
        )
    if os.geteuid() != 0:
        pytest.skip("the private Slurm cluster runs its daemons as root")
    root = tmp_path_factory.mktemp("slurm")
    node = socket.gethostname().split(".")[0]
    conf = _write_conf(root, node)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "TITAN_"))
    }
    env["SLURM_CONF"] = str(conf)
    site_env = root / "site.env"
    site_env.write_text(
        "export TITAN_NPROC_PER_NODE=2\n"
        'titan_site_setup() { echo "site setup ran on $(hostname)"; }\n'
    )
    env["TITAN_SITE_ENV"] = str(site_env)
    try:
        socket.gethostbyname(node)
    except OSError:
        env["TITAN_RDZV_HOST"] = "127.0.0.1"  # the node name does not resolve here
    cluster = SlurmCluster(root, conf, node, env)
    daemons = []
    try:
        for argv in (
            ["slurmctld", "-D", "-f", str(conf)],
            ["slurmd", "-D", "-f", str(conf), "-N", node],
        ):
            with open(root / "log" / f"{argv[0]}.out", "w") as out:
                daemons.append(
                    subprocess.Popen(
                        argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        deadline = time.monotonic() + 60
        while cluster.cmd("sinfo", "-h", "-o", "%T", check=False).stdout.strip() != "idle":
            if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
                pytest.fail(f"the private Slurm cluster did not come up:\n{cluster.logs()}")
            time.sleep(0.5)
        yield cluster
    finally:
        jobs = cluster.cmd("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            cluster.cmd("scancel", *jobs, check=False)
            deadline = time.monotonic() + 20
            while (
                time.monotonic() < deadline
                and cluster.cmd("squeue", "-h", "-o", "%i", check=False).stdout.strip()
            ):
                time.sleep(0.5)
        for d in daemons:
            d.terminate()
        for d in daemons:
            try:
                d.wait(timeout=10)
            except subprocess.TimeoutExpired:
                d.kill()
                d.wait()
        # Whatever is left (slurmstepd, job processes) carries this cluster's SLURM_CONF.
        _stop(_pids_with_env("SLURM_CONF", str(conf)), signal.SIGKILL, 5)


# ----------------------------------------------------------------------------- jobs


def test_recipe_scripts_accepted_by_sbatch(slurm_cluster: SlurmCluster) -> None:
    """Every header passes a real sbatch; site options arrive as SBATCH_* variables (as
    from slurm/site.env) and the command line beats the header (-N 1 against --nodes=4)."""
    site = {"SBATCH_PARTITION": "debug", "SBATCH_TIMELIMIT": "01:00:00"}
    for name in RECIPE_SCRIPTS:
        result = slurm_cluster.cmd(
            "sbatch", "--test-only", "-N", "1", f"slurm/{name}", cwd=ROOT, env=site
        )
        assert f"on nodes {slurm_cluster.node} in partition debug" in result.stderr, name


def test_launcher_refuses_a_job_without_gpus_or_cpu_ranks(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    site = tmp_path / "site.env"
    site.write_text("# no GPUs requested and no TITAN_NPROC_PER_NODE\n")
    log = tmp_path / "job.log"
    job = slurm_cluster.submit("train_debug.sh", log=log, env={"TITAN_SITE_ENV": str(site)})
    assert slurm_cluster.wait(job, log)["JobState"] == "FAILED"
    assert "the job has no GPUs" in log.read_text()


def test_recipe_mistake_is_one_line_and_exit_2(
    slurm_cluster: SlurmCluster, synthetic_dir: Path, tmp_path: Path
) -> None:
    """A typo in an override: the job fails with exit status 2 and the log says why in one
    line (the launcher checks the recipe before any worker starts)."""
    log = tmp_path / "job.log"
    args = [*_overrides(tmp_path / "run", synthetic_dir, steps=2, interval=2), "--training.step=3"]
    job = slurm_cluster.submit("train_debug.sh", *args, log=log)
    state = slurm_cluster.wait(job, log)
    text = log.read_text()
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", (state, text[-3000:])
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    assert errors == [
        "error: unknown config key 'training.step' (did you mean 'training.steps'?); [training] "
        "has: " + errors[0].split("has: ", 1)[1]
    ], text[-3000:]
    assert "Traceback" not in text and "ChildFailedError" not in text


def test_8b_script_runs_its_recipe(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """An 8B script, submitted as a user would (-N 1 here, one CPU rank), runs train.py on
    its recipe with --job.dry_run: config, model and batch plan resolved, nothing trained.
    (The other recipe scripts are the same line with another name; see the static test.)"""
    site = tmp_path / "site.env"
    site.write_text("export TITAN_NPROC_PER_NODE=1 TITAN_MAX_RESTARTS=0\n")
    log = tmp_path / "job.log"
    job = slurm_cluster.submit(
        "train_primate_8B_131k.sh",
        "--job.dry_run",
        log=log,
        sbatch_args=("-N", "1"),
        env={"TITAN_SITE_ENV": str(site)},
    )
    state = slurm_cluster.wait(job, log)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", text[-4000:]
    assert "recipe train_configs/primate_8b_131k.toml, 1 node(s) x 1 rank(s)" in text
    assert "dry run" in text and "llama3 8B" in text, text[-4000:]


def _overrides(dump: Path, data: Path, steps: int, interval: int) -> list[str]:
    return [
        f"--job.dump_folder={dump}",
        f"--training.dataset_path={data}",
        f"--training.steps={steps}",
        "--checkpoint.enable_checkpoint",
        f"--checkpoint.interval={interval}",
        "--metrics.log_freq=1",
    ]


def _metric_steps(dump: Path) -> list[int]:
    assert (dump / "metrics.jsonl").is_file(), f"no {dump / 'metrics.jsonl'}"
    return [r["step"] for r in read_metrics(dump)]


def _complete_steps(dump: Path) -> list[int]:
    return [s.step for s in list_steps(dump / "checkpoint") if s.complete]


def _run_job(cluster: SlurmCluster, log: Path, *args: str) -> str:
    job = cluster.submit("train_debug.sh", *args, log=log)
    state = cluster.wait(job, log)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", f"job {job}: {state['JobState']}\n{text[-4000:]}"
    return text


def test_sbatch_trains_then_resumes(
    slurm_cluster: SlurmCluster, synthetic_dir: Path, tmp_path: Path
) -> None:
    dump = tmp_path / "run"
    log = tmp_path / "first.log"
    text = _run_job(slurm_cluster, log, *_overrides(dump, synthetic_dir, steps=4, interval=2))
    assert "site setup ran on" in text and "1 node(s) x 2 rank(s)" in text, text
    assert _metric_steps(dump) == [1, 2, 3, 4]
    assert _complete_steps(dump)[-1] == 4
    # Rank-0 output in the job log; every rank's own output beside it.
    assert "Resumed from" not in text
    ranks = {p.parent.name for p in log.with_suffix(".ranks").glob("*/attempt_0/*/stdout.log")}
    assert ranks == {"0", "1"}

    log = tmp_path / "second.log"
    text = _run_job(slurm_cluster, log, *_overrides(dump, synthetic_dir, steps=6, interval=2))
    assert re.search(r"Resumed from \S*step-4\b.* at step 4\b", text), text[-4000:]
    assert _metric_steps(dump) == [1, 2, 3, 4, 5, 6]
    assert _complete_steps(dump)[-1] == 6


def test_warning_signal_saves_requeues_and_finishes(
    slurm_cluster: SlurmCluster, synthetic_dir: Path, tmp_path: Path
) -> None:
    """Slurm's warning signal to the batch shell (what --signal=B:USR1@N sends): the run
    finishes its step, saves, exits 75, the job is requeued, and the requeued job resumes
    and finishes with every step logged once."""
    dump = tmp_path / "run"
    log = tmp_path / "job.log"
    steps = 120  # long enough that the signal lands mid-run
    args = [*_overrides(dump, synthetic_dir, steps=steps, interval=1000), "--training.seq_len=64"]
    job = slurm_cluster.submit("train_debug.sh", *args, log=log)
    # what the README's chain does: the next job waits for this one's whole recipe
    after = tmp_path / "seen_by_next_job"
    slurm_cluster.cmd(
        "sbatch",
        f"--dependency=afterok:{job}",
        f"--output={tmp_path / 'next.log'}",
        f"--wrap=ls {dump / 'checkpoint'} > {after}.tmp && mv {after}.tmp {after}",
    )
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (dump / "metrics.jsonl").is_file() or len(_metric_steps(dump)) < 20:
        assert time.monotonic() < deadline, "the job did not get going in time"
        assert slurm_cluster.state(job)["JobState"] in ("PENDING", "RUNNING"), log.read_text()
        time.sleep(0.2)
    slurm_cluster.cmd("scancel", "--batch", "--signal=USR1", str(job))

    state = slurm_cluster.wait(job, log)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", f"{state}\n{text[-3000:]}\n{slurm_cluster.logs()}"
    assert int(state.get("Restarts", "0")) == 1, state
    stopped = re.search(r"stopped: SIGUSR1 at step (\d+): saved checkpoint step-\1", text)
    assert stopped, text[-4000:]
    assert f"job {job} requeued" in text
    assert re.search(rf"Resumed from \S*step-{stopped.group(1)}\b", text), text[-4000:]
    assert sorted(_metric_steps(dump)) == list(range(1, steps + 1))  # each step once
    assert _complete_steps(dump)[-1] == steps
    deadline = time.monotonic() + 60
    while not after.is_file():
        assert time.monotonic() < deadline, "the afterok job did not run"
        time.sleep(0.5)
    assert f"step-{steps}" in after.read_text().split(), after.read_text()


def test_lock_of_a_job_slurm_no_longer_runs_is_taken_over(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """A killed job's lock on another node, refreshed a moment ago, would block the next
    job of a chain for minutes; Slurm says the job is over, so it is taken over at once."""
    import json
    import sys

    owner = {"host": "another-node", "pid": 1, "slurm_job": "424242", "started": "earlier"}
    (tmp_path / ".lock").write_text(json.dumps(owner))
    code = (
        "import sys; from pathlib import Path; from titan.logging import init_logger; "
        "from titan.lifecycle import RunLock; init_logger(0); RunLock(Path(sys.argv[1])).acquire()"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        env=slurm_cluster.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "its Slurm job 424242 is no longer known to Slurm" in result.stdout + result.stderr
    assert json.loads((tmp_path / ".lock").read_text())["slurm_job"] is None


def test_killed_ranks_are_restarted(
    slurm_cluster: SlurmCluster, synthetic_dir: Path, tmp_path: Path
) -> None:
    dump = tmp_path / "run"
    log = tmp_path / "job.log"
    steps = 6
    args = _overrides(dump, synthetic_dir, steps=steps, interval=2)
    job = slurm_cluster.submit("train_debug.sh", *args, log=log)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not _complete_steps(dump):
        assert time.monotonic() < deadline, "no checkpoint was written in time"
        assert slurm_cluster.state(job)["JobState"] in ("PENDING", "RUNNING"), log.read_text()
        time.sleep(0.2)
    saved = _complete_steps(dump)[-1]
    killed = worker_pids(dump)
    assert len(killed) == 2, f"expected the job's 2 ranks, found {killed}"
    _stop(killed, signal.SIGKILL, 10)  # as a node failure would

    state = slurm_cluster.wait(job, log)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED", text[-4000:]
    assert list(log.with_suffix(".ranks").glob("*/attempt_1")), "torchrun did not restart"
    assert "Resumed from" in text, text[-4000:]
    metric_steps = _metric_steps(dump)
    assert metric_steps[-1] == steps and _complete_steps(dump)[-1] == steps
    assert set(metric_steps) == set(range(1, steps + 1))
    assert saved < steps, f"the job had finished ({saved} steps) before its ranks were killed"
