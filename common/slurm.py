"""What only a Slurm job needs: the variables torch.distributed reads, with the address of the
job's first node as the master of the process group (under srun), and putting the job back in
the queue after a stop signal."""
import os
import re
import subprocess


def set_torchrun_env(rank, world_size, local_rank):
    """Under srun, the environment torchrun would give: RANK, WORLD_SIZE, LOCAL_RANK, and
    MASTER_ADDR and MASTER_PORT unless set (the first node; a port fixed by the job id)."""
    env = os.environ
    env.setdefault("MASTER_ADDR", master_addr())
    env.setdefault("MASTER_PORT", str(29500 + int(env.get("SLURM_JOB_ID", "0")) % 10000))
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = map(str, (rank, world_size, local_rank))


def master_addr():
    """First host of SLURM_JOB_NODELIST (e.g. 'gpu[03-05]' -> 'gpu03')."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return first_host(nodelist)


def first_host(nodelist):
    """The first host of a Slurm node list, without scontrol: 'gpu[03-05,07],cpu1' -> 'gpu03',
    'a,b' -> 'a', 'n[1-2]-ib' -> 'n1-ib'."""
    head = re.match(r"[^,\[]*(?:\[[^\]]*\][^,\[]*)?", nodelist).group(0)
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


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
