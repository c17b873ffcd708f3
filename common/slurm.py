"""What only a Slurm job needs: the variables torch.distributed reads under srun, and putting the
job back in the queue after a stop signal."""
import os
import re
import subprocess


def set_torchrun_env(rank, world_size, local_rank):
    """Under srun, the environment torchrun would give: RANK, WORLD_SIZE, LOCAL_RANK, and
    MASTER_ADDR and MASTER_PORT unless set (the first node; a port fixed by the job id)."""
    env = os.environ
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        try:
            env["MASTER_ADDR"] = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                check=True, timeout=30).stdout.split()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["MASTER_ADDR"] = first_host(nodelist)
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = map(str, (rank, world_size, local_rank))


def first_host(nodelist):
    """The first host of a Slurm node list, without scontrol: 'gpu[03-05,07],cpu1' -> 'gpu03',
    'a,b' -> 'a', 'n[1-2]-ib' -> 'n1-ib'."""
    # the prefix, the first number of the first bracket (if any), and what follows the bracket
    parts = re.match(r"([^,\[]*)(?:\[([^,\]-]*)[^\]]*\])?([^,\[]*)", nodelist).groups(default="")
    return "".join(parts)


def requeue_job():
    """Put this Slurm job back in the queue: the requeued job keeps its id, hence its run
    directory, and resumes from the checkpoint. Slurm then ends the job's processes (the output
    shows "CANCELLED ... DUE TO JOB REQUEUE"). Returns a line for the log, None outside Slurm."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True,
                              timeout=120)
        error = done.stderr.strip() if done.returncode else None
    except (OSError, subprocess.SubprocessError) as e:
        error = str(e)
    if error:  # e.g. a job submitted with --no-requeue
        return (f"could not requeue Slurm job {job} ({error}): submit it again with the same "
                f"--run-dir to resume")
    return f"requeued Slurm job {job}"
