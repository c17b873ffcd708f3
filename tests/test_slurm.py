"""Slurm: `slurm/train.sbatch` on a real one-node Slurm cluster, started by the test.

The cluster (munged, slurmctld, slurmd from Debian's packages; `.ci/run` installs them) lives in a
temporary directory with its own ports and munge socket, runs 2-CPU jobs of 2 gloo tasks each,
and is stopped by pid at the end whatever happens. Without those programs, or without root (slurmd
launches the tasks), the cluster tests skip with the reason.

One module-scoped cluster serves the jobs below, which overlap in time: the preempted job waits
about two minutes in the queue after requeueing itself (Slurm's BeginTime), and the other jobs
run meanwhile.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.checkpoint import export_backbone
from common.data import make_loader
from common.slurm import first_host, requeue_job
from common.model import resnet_backbone
from tests.helpers import REPO, assert_same_tensors, read_log

PROGRAMS = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "srun",
            "sinfo"]
MISSING = [p for p in PROGRAMS if shutil.which(p) is None]
needs_slurm = pytest.mark.skipif(
    bool(MISSING) or os.geteuid() != 0,
    reason=f"a Slurm cluster needs {', '.join(MISSING)} (apt-get install slurmctld slurmd "
           f"slurm-client munge)" if MISSING else "slurmd must run as root to launch jobs")

STEPS_PER_EPOCH = 15  # 480 images / global batch 32; ranks agree on a stop every 10 steps
TRAIN = ["--data", "synthetic", "--arch", "resnet18", "--img-size", "16", "--synthetic-size",
         "480", "--batch-size", "32", "--epochs", "2", "--log-every", "1", "--knn-every", "0"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SLURM_CONF = """\
ClusterName=cleanssltest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={dir}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
NodeName={host} CPUs=2 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    def __init__(self, root):
        self.dir = Path(root)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
        self.env["SLURM_CONF"] = str(self.dir / "slurm.conf")
        # the jobs' `python` is the interpreter running the tests
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        self.daemons = []

    def start(self):
        munge = self.dir / "munge"
        for sub in ("munge", "state", "spool"):
            (self.dir / sub).mkdir(mode=0o700)
        (munge / "munge.key").write_bytes(os.urandom(1024))
        os.chmod(munge / "munge.key", 0o600)
        host = socket.gethostname().split(".")[0]
        (self.dir / "slurm.conf").write_text(SLURM_CONF.format(
            host=host, dir=self.dir, ctld_port=free_port(), d_port=free_port()))
        # in the foreground (-F, -D): the Popen pid is the daemon's, to stop it by pid
        self.daemon(["munged", "-F", "--force", f"--socket={munge}/munge.socket",
                     f"--key-file={munge}/munge.key", f"--pid-file={munge}/munged.pid",
                     f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"])
        self.wait_for(lambda: (munge / "munge.socket").exists(), 30, "munged")
        self.daemon(["slurmctld", "-D", "-i"])
        self.daemon(["slurmd", "-D"])
        self.wait_for(lambda: self.cmd("sinfo", "-h", "-o", "%t").stdout.strip() == "idle", 60,
                      "the node to be idle")

    def daemon(self, argv):
        log = open(self.dir / f"{argv[0]}.stderr", "w")
        self.daemons.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=log))

    def stop(self):
        if self.daemons[1:]:  # slurmctld runs: cancel what is left, let slurmd clean up
            self.cmd("scancel", "--full", "--user=root")
            self.wait_for(lambda: not self.cmd("squeue", "-h").stdout.strip(), 30, None)
        for proc in reversed(self.daemons):
            proc.terminate()
        for proc in self.daemons:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def cmd(self, *argv):
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)

    def wait_for(self, condition, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return True
            time.sleep(0.5)
        if what:
            logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}"
                             for p in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.stderr")))
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{logs}")
        return False

    def submit(self, *sbatch_flags, script="simclr.py", train=TRAIN):
        """sbatch the real slurm/train.sbatch with `script`: 2 CPU tasks on the one node."""
        out = self.cmd("sbatch", "--parsable", "--gpus-per-node=0", "--ntasks-per-node=2",
                       "--cpus-per-task=1", f"--chdir={self.dir}",
                       f"--output={self.dir}/slurm-%j.out", *sbatch_flags,
                       str(REPO / "slurm" / "train.sbatch"), str(REPO / script), *train)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip().split(";")[0]

    def job(self, job_id):
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def run_dir(self, job_id, method="simclr"):
        return self.dir / "runs" / method / job_id

    def output(self, job_id):
        path = self.dir / f"slurm-{job_id}.out"
        return path.read_text() if path.exists() else ""

    def wait_for_step(self, job_id, step, timeout=120, method="simclr"):
        log = self.run_dir(job_id, method) / "log.jsonl"
        self.wait_for(lambda: log.exists() and any(r.get("step", 0) >= step
                                                   for r in read_log(log.parent)),
                      timeout, f"job {job_id} to reach step {step}\n{self.output(job_id)}")

    def preempt(self, job_id, method="simclr"):
        """SIGUSR1 to the tasks of `job_id` once it has logged step 2, as Slurm does before a
        time limit (`--signal=USR1@120`); returns once the job has requeued itself (it then
        waits in the queue for about two minutes)."""
        self.wait_for_step(job_id, 2, method=method)
        assert self.cmd("scancel", "--signal=USR1", job_id).returncode == 0
        requeued = {"JobState": "PENDING", "Restarts": "1"}
        self.wait_for(lambda: requeued.items() <= self.job(job_id).items(), 120,
                      f"job {job_id} to requeue itself\n{self.output(job_id)}")
        return job_id

    def wait_until_done(self, job_id, timeout):
        self.wait_for(lambda: self.job(job_id).get("JobState") in ("COMPLETED", "FAILED",
                                                                    "CANCELLED", "TIMEOUT"),
                      timeout, f"job {job_id} to end\n{self.output(job_id)}")
        return self.job(job_id)

    def task_pids(self, job_id, rank):
        """pids of the python processes of `job_id`'s task `rank`."""
        pids = []
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                env = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if (Path(argv[0].decode()).name.startswith("python")
                    and f"SLURM_JOB_ID={job_id}".encode() in env
                    and f"SLURM_PROCID={rank}".encode() in env):
                pids.append(int(proc.name))
        return pids


@pytest.fixture(scope="module")
def cluster(module_tmp):
    cluster = Cluster(module_tmp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def final_weights(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", weights_only=False)


@pytest.fixture(scope="module")
def preempted(cluster):
    """A job sent SIGUSR1 during epoch 1, as Slurm does before a time limit (`--signal=USR1@120`
    signals the tasks), with a loader worker per task (Slurm signals those too). Returns its id
    once it has requeued itself; it then waits in the queue for about two minutes."""
    return cluster.preempt(cluster.submit(train=[*TRAIN, "--workers", "1"]))


@pytest.mark.full
@needs_slurm
def test_preempted_job_saves_mid_epoch_and_requeues_itself(cluster, preempted):
    output = cluster.output(preempted)
    assert cluster.job(preempted)["Reason"] == "BeginTime", output  # Slurm's pause before a rerun
    stop = [line for line in output.splitlines() if line.startswith("stop signal: saved")]
    # the first step the ranks agree on after the signal: batch 10 of epoch 0 (or of epoch 1 on
    # a machine slow to deliver the signal); either way inside the epoch
    assert stop and stop[0].split(" at ")[1] in ("epoch 0, batch 10", "epoch 1, batch 10"), output
    assert f"requeued Slurm job {preempted}" in output
    ckpt = final_weights(cluster.run_dir(preempted))
    assert ckpt["batch_in_epoch"] == 10
    steps = [r["step"] for r in read_log(cluster.run_dir(preempted)) if "step" in r]
    assert steps == list(range(1, ckpt["epoch"] * STEPS_PER_EPOCH + 11))


# linear_eval.py under train.sbatch: 15 steps of 32 images per epoch, on a random backbone
EVAL = ["--data", "synthetic", "--img-size", "16", "--synthetic-size", "480", "--batch-size", "32",
        "--epochs", "2", "--lr", "1.0", "--log-every", "1", "--workers", "1"]


@pytest.fixture(scope="module")
def eval_ckpt(cluster):
    torch.manual_seed(0)
    path = cluster.dir / "backbone.pt"
    export_backbone(resnet_backbone("resnet18", cifar_stem=True), path)
    return path


@pytest.fixture(scope="module")
def preempted_eval(cluster, eval_ckpt):
    """linear_eval.py sent SIGUSR1 during its first epoch; returns its id once requeued."""
    job_id = cluster.submit(script="linear_eval.py", train=["--ckpt", str(eval_ckpt), *EVAL])
    return cluster.preempt(job_id, method="linear_eval")


@pytest.mark.full
@needs_slurm
def test_preempted_linear_eval_saves_and_requeues_itself(cluster, preempted_eval):
    output = cluster.output(preempted_eval)
    assert "2 process(es) on cpu" in output and "stop signal: saved" in output, output
    assert f"requeued Slurm job {preempted_eval}" in output
    ckpt = final_weights(cluster.run_dir(preempted_eval, "linear_eval"))
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) in ((0, 10), (1, 0), (1, 10)), output


@pytest.mark.full
@needs_slurm
def test_signal_to_the_batch_shell_reaches_the_tasks(cluster):
    # `scancel --batch` (and `--signal=B:USR1@...`) signals only the batch script's shell, whose
    # default action for SIGUSR1 is to die: train.sbatch hands it on to srun and the tasks. With
    # --no-requeue the job cannot requeue itself: it says so, and ends cleanly with its checkpoint.
    job_id = cluster.submit("--no-requeue")
    cluster.wait_for_step(job_id, 2)
    assert cluster.cmd("scancel", "--batch", "--signal=USR1", job_id).returncode == 0
    job = cluster.wait_until_done(job_id, 240)
    output = cluster.output(job_id)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "0", output
    assert "stop signal: saved" in output and "done:" not in output, output
    assert f"could not requeue Slurm job {job_id}" in output
    assert "submit it again with the same --run-dir" in output
    ckpt = final_weights(cluster.run_dir(job_id))
    assert 0 < ckpt["batch_in_epoch"] < STEPS_PER_EPOCH


@pytest.mark.full
@needs_slurm
def test_a_dead_rank_ends_the_job(cluster):
    job_id = cluster.submit(train=[*TRAIN, "--workers", "0", "--epochs", "50"])
    cluster.wait_for_step(job_id, 2)
    (pid,) = cluster.task_pids(job_id, rank=1)
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    job = cluster.wait_until_done(job_id, 120)
    output = cluster.output(job_id)
    assert time.time() - killed < 60, "the surviving rank hung"
    assert job["JobState"] == "FAILED", output
    assert "task 1: Killed" in output, output  # srun names the rank that died
    # rank 0 did not wait for its peer: srun ended it (--kill-on-bad-exit), or its collective
    # failed first ("Connection closed by peer"), whichever came first
    assert "done:" not in output


@pytest.mark.full
@needs_slurm
def test_a_diverged_job_fails_without_requeue(cluster):
    # a rate that blows the weights up in the first epoch: both ranks stop at the epoch's save,
    # nothing is saved, and the job ends FAILED with exit code 3, not requeued into the same
    # divergence
    job_id = cluster.submit(train=[*TRAIN, "--workers", "0", "--optimizer", "sgd", "--lr",
                                   "1e12", "--warmup-epochs", "0"])
    job = cluster.wait_until_done(job_id, 180)
    output = cluster.output(job_id)
    assert job["JobState"] == "FAILED" and job["Restarts"] == "0", output
    assert "the run diverged and stopped without saving" in output, output
    assert "requeue" not in output.split("restart 0")[-1], output
    run_dir = cluster.run_dir(job_id)
    assert (run_dir / "diverged.json").exists() and not (run_dir / "checkpoint.pt").exists()
    # the ranks exit with 3; srun (--kill-on-bad-exit) ends the others as soon as one has
    # exited, so a rank still exiting then shows as terminated (143) in the job's exit code
    assert re.search(r"tasks? [0-9-]+: Exited with exit code 3", output), output
    assert job["ExitCode"] in ("3:0", "143:0"), (job["ExitCode"], output)


def test_requeue_reports_what_scontrol_did(tmp_path, monkeypatch):
    """requeue_job runs `scontrol requeue $SLURM_JOB_ID` and reports failure (a fake
    scontrol records its arguments)."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_job() is None  # outside Slurm: nothing to do
    fake = tmp_path / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\n"
                    "[ \"$2\" = 42 ] || { echo 'Requested operation is disabled' >&2; exit 1; }\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    assert requeue_job() == "requeued Slurm job 42"
    assert (tmp_path / "args").read_text().split() == ["requeue", "42"]
    monkeypatch.setenv("SLURM_JOB_ID", "43")
    message = requeue_job()
    assert message.startswith("could not requeue Slurm job 43 (Requested operation is disabled)")


def test_first_host_of_a_node_list(tmp_path):
    """The master address when scontrol is not at hand (with it: `scontrol show hostnames`)."""
    assert first_host("gpu[03-05,07],cpu1") == "gpu03"
    assert first_host("a1,gpu[1-2]") == "a1"
    assert first_host("node7") == "node7"
    assert first_host("n[12-13]-ib,m1") == "n12-ib"
    if shutil.which("scontrol"):  # the two agree (scontrol needs a slurm.conf, not a cluster)
        (tmp_path / "slurm.conf").write_text("ClusterName=x\nSlurmctldHost=localhost\n")
        env = {**os.environ, "SLURM_CONF": str(tmp_path / "slurm.conf")}
        for nodelist in ("gpu[03-05,07],cpu1", "a1,gpu[1-2]", "node7", "gpu[3-4]"):
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                                 text=True, timeout=30, env=env)
            assert out.stdout.split()[0] == first_host(nodelist), (nodelist, out.stderr)


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.tensor(i)


def test_loader_workers_survive_stop_signals():
    """Slurm signals every process of a job step. A loader worker must not die of SIGUSR1 or
    SIGTERM (their default action) before the main process saves at the next step: it ignores
    them. (This test process has no handler for them, as with the spawn start method.)"""
    loader = make_loader(Numbers(), batch_size=4, workers=2, shuffle=False)
    it = iter(loader)
    first = next(it)
    for worker in it._workers:
        os.kill(worker.pid, signal.SIGUSR1)
        os.kill(worker.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert all(w.is_alive() for w in it._workers)
    batches = [first, *it]
    assert torch.cat(batches).tolist() == list(range(64))


@pytest.mark.full
@needs_slurm
def test_requeued_job_resumes_exactly(cluster, preempted):
    # the tests above ran while the preempted job waited in the queue; now the same run,
    # uninterrupted, then the preempted one once Slurm has started it again
    uninterrupted = cluster.submit(train=[*TRAIN, "--workers", "1"])
    assert cluster.wait_until_done(uninterrupted, 240)["JobState"] == "COMPLETED"
    job = cluster.wait_until_done(preempted, 400)
    output = cluster.output(preempted)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output
    assert output.count("=== ") == 2 and "restart 1:" in output, output  # appended, not replaced
    position = output.split("stop signal: saved")[1].split(" at ")[1].splitlines()[0]
    assert f"resumed from runs/simclr/{preempted}/checkpoint.pt at {position}" in output
    assert "done:" in output

    # the log kept the steps from before the stop and the resumed steps continue them: every
    # step once, with exactly the uninterrupted run's losses; weights and momenta are identical
    log, reference = read_log(cluster.run_dir(preempted)), read_log(cluster.run_dir(uninterrupted))
    assert [r["step"] for r in log if "step" in r] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert [r["loss"] for r in log if "step" in r] == [r["loss"] for r in reference if "step" in r]
    a, b = final_weights(cluster.run_dir(preempted)), final_weights(cluster.run_dir(uninterrupted))
    assert (a["epoch"], a["batch_in_epoch"]) == (b["epoch"], b["batch_in_epoch"]) == (2, 0)
    assert_same_tensors(a["model"], b["model"])
    for k in b["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"],
                           b["optimizer"]["state"][k]["momentum_buffer"]), k


@pytest.mark.full
@needs_slurm
def test_requeued_linear_eval_resumes_exactly(cluster, preempted_eval, eval_ckpt):
    uninterrupted = cluster.submit(script="linear_eval.py", train=["--ckpt", str(eval_ckpt), *EVAL])
    assert cluster.wait_until_done(uninterrupted, 240)["JobState"] == "COMPLETED"
    job = cluster.wait_until_done(preempted_eval, 400)
    output = cluster.output(preempted_eval)
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", output
    assert f"resumed from runs/linear_eval/{preempted_eval}/checkpoint.pt" in output
    a = cluster.run_dir(preempted_eval, "linear_eval")
    b = cluster.run_dir(uninterrupted, "linear_eval")
    assert [r["step"] for r in read_log(a) if "step" in r] == list(range(1, 31))
    assert [r["loss"] for r in read_log(a) if "step" in r] == \
        [r["loss"] for r in read_log(b) if "step" in r]
    assert [r.get("val_top1") for r in read_log(a)] == [r.get("val_top1") for r in read_log(b)]
    assert_same_tensors(final_weights(a)["model"], final_weights(b)["model"])
    result = [json.loads((d / "result.json").read_text()) for d in (a, b)]
    assert result[0]["top1"] == result[1]["top1"] and result[0]["top5"] == result[1]["top5"]
    assert torch.equal(torch.load(a / "linear_head.pt")["weight"],
                       torch.load(b / "linear_head.pt")["weight"])
