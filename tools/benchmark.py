"""One command for a results table: train every method, evaluate every backbone, write the table.

    python tools/benchmark.py --data cifar10 --methods all --arch resnet18 --epochs 200 \\
        --out results/cifar10-200ep
    python tools/benchmark.py ... --nproc-per-node 8 -- --precision bf16   # flags for every method
    python tools/benchmark.py ... --parallel 4 -- --data-on-device         # 4 methods on one GPU
    python tools/benchmark.py ... --epochs 4 --speed-test 1,2,4 --out results/speed
    python tools/benchmark.py --render-readme README.md docs/*.md          # refresh its tables

Each method's script runs as a subprocess (through torchrun with --nproc-per-node N > 1) in its own
run directory, OUT/runs/<method>; then linear_eval.py evaluates its backbone.pt: weighted kNN top-1
(k=200, T=0.07, the whole labelled train split as memory) and a linear probe (top-1/top-5; the
standard protocol, or --linear cached). OUT/results.json and OUT/results.md hold, per method:
epochs, batch, kNN top-1 of the random initialisation (the training's epoch-0 monitor) and after
training, linear top-1/top-5, training wall-clock time, img/s, peak GPU memory, epoch time and how
many trainings shared the device; with the hardware, versions, git revision and the exact commands.
OUT/curves.png draws the training curves (tools/plot.py; needs matplotlib) from OUT/records, a copy
of each finished run's log.jsonl and args.json. Every step's output goes to
OUT/logs/<method>.<step>.log.

--parallel N runs up to N methods at once, each in its own processes (its training, then its
evaluations), all on the same device: one small model rarely fills a large GPU. The results are
those of a sequential run; only the timings differ. --speed-test K,K,... trains every method a
few epochs with K side by side for each K (train only) and tabulates the epoch times
(OUT/speed.md), so that the best N can be chosen. --time-budget bounds a call: with
--estimate-from (a speed test of the same settings) a method starts only if its estimated time
fits, and whatever still runs at the end is stopped and saved.

Calling it again with the same --out (and --runs-dir) skips what is done and resumes what is not
(the scripts resume from their checkpoints); a method that fails is reported in the table, and the
others go on. A finished row whose run folder is gone (only the small files were kept) stays as it
is. Ctrl-C or SIGTERM stops every running step by its pid: each saves and exits, and a second call
resumes them.
"""
import argparse
import copy
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torchvision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: tools.plot lives beside it

from common.checkpoint import load_checkpoint  # noqa: E402
from tools import plot  # noqa: E402

METHODS = ("simclr", "moco", "byol", "simsiam", "swav", "barlow", "vicreg")
# what makes two calls the same benchmark (another --out is needed to change them)
SETTINGS = ("data", "train_per_class", "val_per_class", "methods", "arch", "epochs",
            "batch_size", "img_size", "synthetic_size",
            "nproc_per_node", "linear", "linear_epochs", "linear_batch_size", "method_flags",
            "extra")
# a speed test measures the same runs, shorter and possibly of fewer methods
SPEED_SETTINGS = tuple(k for k in SETTINGS if k not in ("epochs", "methods"))
POLL = 0.05  # seconds between two looks at the running steps
# The time of a row's kNN and linear evaluation until a speed test (which times the first
# method's) or a row of the table has measured it: generous for CIFAR on a GPU.
EVAL_GUESS_SECONDS = 120.0
MARGIN = 1.1  # estimates are stretched by this factor before they are compared with the budget
# After the time budget's SIGTERM, a step has this long to save and exit before it is killed: the
# call must end before whatever bounds it from outside does.
GRACE_SECONDS = 30


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog="Flags after -- go to every method's script, e.g. "
                                       "-- --data-on-device --precision bf16.")
    p.add_argument("--data", help="as the scripts' --data: cifar10, an ImageFolder root, ...")
    p.add_argument("--train-per-class", type=int, help="an ImageFolder --data: use the first N "
                   "train images of each class (linked into OUT/data, nothing copied)")
    p.add_argument("--val-per-class", type=int, help="the same for the val split")
    p.add_argument("--out", type=Path, help="the benchmark's folder (a second call resumes it)")
    p.add_argument("--runs-dir", type=Path, help="where the run folders (checkpoints) and the "
                   "evaluations' folders go (default: --out): e.g. a scratch disk, with the "
                   "small files (results, logs, curves) in --out")
    p.add_argument("--methods", default="all", help="comma-separated, in order (default: all)")
    p.add_argument("--arch", default="resnet18", help="backbone of every method (resnet18)")
    p.add_argument("--epochs", type=int, default=200, help="pre-training epochs (200)")
    p.add_argument("--batch-size", type=int, help="global batch (default: each recipe's)")
    p.add_argument("--img-size", type=int, help="default: the scripts' default for --data")
    p.add_argument("--data-dir", help="where cifar10/cifar100/stl10 live (the scripts' default)")
    p.add_argument("--workers", type=int, help="loader workers per process (default: the "
                   "scripts' default, divided among --parallel methods)")
    p.add_argument("--synthetic-size", type=int, help="images of --data synthetic (smoke runs)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes, one per GPU (1)")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="train up to N methods at once, side by side on the same device, each "
                        "then evaluated in its slot (1: one after another)")
    p.add_argument("--speed-test", metavar="K,K,...", help="measure instead of filling the "
                   "table: train every method --epochs epochs (no evaluation) with K methods side "
                   "by side, for each K, in OUT/parallel-K; tabulate the epoch times in "
                   "OUT/speed.md and OUT/speed.json")
    p.add_argument("--train-only", action="store_true",
                   help="train, do not evaluate (a later call without it evaluates)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="end this call within SECONDS: with --estimate-from, a method starts only "
                        "if its estimated time fits in what is left; whatever still runs at the "
                        "end is stopped (it saves its checkpoint)")
    p.add_argument("--estimate-from", type=Path, metavar="FOLDER", help="a --speed-test folder "
                   "of the same settings (other --epochs and --methods allowed): the epoch times "
                   "and start-up costs that --time-budget's estimates come from; with several K "
                   "measured, the number side by side (up to --parallel) that fits the most rows "
                   "is chosen")
    p.add_argument("--revision", help="the code's revision to record where git cannot tell "
                   "(a copy of the repository without .git)")
    p.add_argument("--linear", choices=["standard", "cached"], default="standard",
                   help="linear probe protocol of linear_eval.py (standard)")
    p.add_argument("--linear-epochs", type=int, help="default: linear_eval.py's (100 at 32 px)")
    p.add_argument("--linear-batch-size", type=int, help="default: linear_eval.py's (512 at 32 px)")
    p.add_argument("--method-flags", nargs="*", default=[], metavar="METHOD=FLAGS",
                   help="flags for one method only, e.g. simclr='--warmup-epochs 1'")
    p.add_argument("--render-readme", type=Path, nargs="+", metavar="MD", help="only re-render "
                   "the blocks between <!-- results: FOLDER [methods=a,b] --> and <!-- /results "
                   "--> of these Markdown files (the README, docs/*.md) from FOLDER/results.json")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)} (flags for the methods go after --)")
    args.extra = extra
    if not args.render_readme and (args.data is None or args.out is None):
        p.error("--data and --out are required")
    args.methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if any("=" not in f for f in args.method_flags):
        p.error("--method-flags takes METHOD=FLAGS, e.g. simclr='--warmup-epochs 1'")
    args.method_flags = dict(f.split("=", 1) for f in args.method_flags)
    try:
        args.speed_test = ([int(k) for k in args.speed_test.split(",")] if args.speed_test
                           else None)
    except ValueError:
        p.error(f"--speed-test takes numbers of methods side by side, e.g. 1,2,4, not "
                f"{args.speed_test}")
    if args.parallel < 1 or min(args.speed_test or [1]) < 1:
        p.error("--parallel and --speed-test count methods side by side: 1 or more")
    # Several torchrun groups on the same GPUs would each want every GPU of the node for
    # themselves (their NCCL rings, their memory); methods side by side are for one device.
    if args.nproc_per_node > 1 and max([args.parallel, *(args.speed_test or [])]) > 1:
        p.error("--parallel/--speed-test above 1 share one device among methods; "
                "--nproc-per-node > 1 already gives each method every GPU: use one or the other")
    if args.speed_test and args.epochs < 3:  # epoch 1 starts up, the last holds the kNN
        p.error("--speed-test times the epochs between the first and the last: --epochs 3 or more")
    if args.estimate_from and not args.time_budget:
        p.error("--estimate-from serves --time-budget: give both")
    return args


# ------------------------------------------------------------------------------- the runs

def launcher(args):
    if args.nproc_per_node > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc_per_node}"]
    return [sys.executable]


def subset(data, out, per_class):
    """OUT/data: an ImageFolder of the first per_class[split] images of each class of `data`
    (sorted by file name), as symbolic links; a split without a number is linked whole."""
    for split, n in per_class.items():
        for folder in sorted(p for p in (Path(data) / split).iterdir() if p.is_dir()):
            target = out / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.iterdir())[:n]:
                if not (target / image.name).exists():
                    (target / image.name).symlink_to(image.resolve())
    return out


def cpus():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def shared_flags(args):
    flags = ["--data", args.data]
    workers = args.workers
    if workers is None and args.parallel > 1:  # the scripts' default (CPUs - 1) is per process
        workers = max(1, cpus() // args.parallel - 1)
    for name, value in (("img_size", args.img_size), ("data_dir", args.data_dir),
                        ("workers", workers), ("synthetic_size", args.synthetic_size)):
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def work_dir(args):
    """Where the run folders and the evaluations' folders live."""
    return args.runs_dir or args.out


def steps(args, method):
    """(name, command, done?) of the method's steps: train, then knn and linear."""
    run_dir, evals = work_dir(args) / "runs" / method, work_dir(args) / "eval"
    train = [*launcher(args), f"{method}.py", *shared_flags(args), "--arch", args.arch,
             "--epochs", str(args.epochs), "--knn-every", str(args.epochs), "--run-dir",
             str(run_dir), *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
             *shlex.split(args.method_flags.get(method, "")), *args.extra]
    evaluate = [*launcher(args), "linear_eval.py", "--ckpt", str(run_dir / "backbone.pt"),
                *shared_flags(args)]
    linear = [*evaluate, *(["--cached-features"] if args.linear == "cached" else []),
              *(["--epochs", str(args.linear_epochs)] if args.linear_epochs else []),
              *(["--batch-size", str(args.linear_batch_size)] if args.linear_batch_size else [])]
    todo = [("train", train, lambda: trained(run_dir, args.epochs)),
            ("knn", [*evaluate, "--knn", "--run-dir", str(evals / f"{method}-knn")],
             lambda: (evals / f"{method}-knn/result.json").exists()),
            ("linear", [*linear, "--run-dir", str(evals / f"{method}-linear")],
             lambda: (evals / f"{method}-linear/result.json").exists())]
    return todo[:1] if args.train_only else todo


def trained_epochs(run_dir):
    """(epoch, batch in that epoch) of the run directory's checkpoint; (0, 0) without one."""
    if not (run_dir / "checkpoint.pt").exists():
        return 0, 0
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    return ckpt["epoch"], ckpt["batch_in_epoch"]


def trained(run_dir, epochs):
    """Whether the run directory holds the checkpoint of its last epoch."""
    return trained_epochs(run_dir) == (epochs, 0)


def child_env(args):
    """The steps' environment. With methods side by side on a CPU, each process gets its share
    of the cores: torch's default (every core per process) makes N processes fight over them."""
    env = dict(os.environ)
    if args.parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, cpus() // args.parallel))
    return env


class Stop:
    """Ctrl-C (SIGINT) and SIGTERM to the benchmark: every running step is sent SIGTERM by its pid
    (a training saves its checkpoint at its next step and exits; a second call resumes it) and
    nothing new starts; a second signal kills them (SIGKILL). The steps themselves ignore Ctrl-C
    (see `spawn`): the benchmark alone decides how they stop, so none is left behind."""

    def __init__(self):
        self.signum, self.procs, self.old = None, set(), {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach it alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.old.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        # no print here: the main loop may be inside a print to the same stream
        again = self.signum is not None
        self.signum = self.signum or signum
        for proc in list(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL if again else signal.SIGTERM)


def spawn(command, log, env):
    """Start a step with SIGINT ignored (inherited through exec; Python then installs no
    KeyboardInterrupt handler): a Ctrl-C at the terminal reaches the whole process group, and a
    training killed by it would lose the steps since its last checkpoint; it is stopped by the
    benchmark's SIGTERM instead. Still in the benchmark's process group, so that a kill of the
    group (a scheduler's, a terminal's) reaches it too."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        if main:
            signal.signal(signal.SIGINT, old)


def median(values):
    return statistics.median(values) if values else None


class Chain:
    """A method's steps still to do (train, knn, linear), one after another in one slot. While
    its training runs, the end-of-epoch records of its log.jsonl are timed as they appear, which
    gives the wall-clock time per epoch (the checkpoint written after each epoch included)."""

    def __init__(self, method, todo, entry, run_dir):
        self.method, self.todo, self.entry, self.run_dir = method, todo, entry, run_dir
        self.proc = self.name = self.log = None
        self.stopped = None  # why this chain was stopped, once it was

    def start(self, args, env, stop):
        self.name, command, _ = self.todo[0]
        path = args.out / "logs" / f"{self.method}.{self.name}.log"
        print(f"{self.method}: {self.name} ... (log: {path})", flush=True)
        self.log = open(path, "a")
        self.log.write(f"$ {shlex.join(command)}\n")
        self.log.flush()
        self.command, self.started, self.seen = command, time.time(), []
        self.together = []  # trainings running at each look, this one included
        log_path = self.run_dir / "log.jsonl"
        self.offset = log_path.stat().st_size if log_path.exists() else 0
        self.proc = spawn(command, self.log, env)
        stop.procs.add(self.proc)

    def read_epochs(self):
        """Time the end-of-epoch records the training appended since the last look."""
        path = self.run_dir / "log.jsonl"
        try:
            if path.stat().st_size <= self.offset:
                return
            with open(path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        now, end = time.time(), data.rfind(b"\n") + 1  # complete lines only
        self.offset += end
        for line in data[:end].splitlines():
            record = json.loads(line)
            if "step" not in record and record.get("epoch", 0) > 0:
                self.seen.append((now, record))

    def poll(self):
        if self.name == "train":
            self.read_epochs()
        return self.proc.poll()

    def halt(self, why):
        """Send SIGTERM (a training saves and exits at its next step)."""
        if self.stopped is None and self.proc.poll() is None:
            self.stopped = why
            self.proc.send_signal(signal.SIGTERM)

    def record_speed(self, seconds):
        """Epoch time (median of log.jsonl's `epoch_time`, the first epoch of this process left
        out: it carries cuDNN's autotuning or compilation), wall-clock seconds per epoch (median
        between two end-of-epoch records; not those that include the kNN monitor), the rest of the
        process's time (start-up, data loading, kNN monitor, end), and the most trainings that ran
        at once while it trained, and how many on average."""
        times = [r["epoch_time"] for _, r in self.seen if "epoch_time" in r]
        wall = median([t1 - t0 for (t0, _), (t1, r1) in zip(self.seen, self.seen[1:])
                       if "knn_top1" not in r1])
        if times:
            self.entry["epoch_time"] = median(times[1:] or times)
        self.entry.update(epoch_wall=wall, side_by_side=max(self.together, default=1),
                          side_by_side_mean=(round(statistics.fmean(self.together), 2)
                                             if self.together else 1),
                          epochs_timed=len(self.seen),
                          train_overhead_seconds=seconds - len(self.seen) * wall if wall else None)


# ------------------------------------------------------------------------------- estimates

def load_estimates(args, settings):
    """{K: {method: (seconds besides the epochs, wall seconds per epoch)}} of --estimate-from's
    speed test, measured with K methods side by side, and the evaluation's seconds it measured
    (None if it did not)."""
    path = args.estimate_from / "speed.json"
    if not path.exists():
        raise SystemExit(f"error: --estimate-from {args.estimate_from}: no speed.json "
                         f"(made by --speed-test)")
    speed = json.loads(path.read_text())
    changed = [k for k in SPEED_SETTINGS if speed["settings"].get(k) != settings.get(k)]
    if changed:
        raise SystemExit(f"error: --estimate-from {args.estimate_from} was measured with other "
                         f"settings ({', '.join(changed)})")
    return {int(k): {m: (e["train_overhead_seconds"], e["epoch_wall"])
                     for m, e in run["methods"].items()
                     if e.get("epoch_wall") and e.get("train_overhead_seconds") is not None}
            for k, run in speed["runs"].items()}, speed.get("eval_seconds")


def eval_seconds(results, measured=None):
    """The evaluation time of a row: the longest measured in this table, else the one the speed
    test measured (`measured`), else a guess."""
    rows = [e["knn_seconds"] + e["linear_seconds"] for e in results["methods"].values()
            if e.get("status") == "done" and "knn_seconds" in e and "linear_seconds" in e]
    return max(rows) if rows else measured or EVAL_GUESS_SECONDS


def estimate(args, method, names, per_method, results, measured_eval=None):
    """Seconds that the steps `names` of `method` are expected to take (MARGIN included), or
    None if its training was not measured."""
    seconds = 0.0
    if "train" in names:
        if method not in per_method:
            return None
        overhead, wall = per_method[method]
        epoch, _ = trained_epochs(work_dir(args) / "runs" / method)
        seconds += overhead + (args.epochs - epoch) * wall
    if any(n != "train" for n in names):
        seconds += eval_seconds(results, measured_eval)
    return seconds * MARGIN


def plan(order, seconds, budget, slots):
    """The methods of `order` that finish within `budget` when each starts, in order, in the
    first of `slots` to free up, and only if its time (`seconds[method]`, None if unknown) fits
    in what is left then: the benchmark's own rule, simulated."""
    free, finishing = [0.0] * slots, []
    for method in order:
        i = min(range(slots), key=free.__getitem__)
        if seconds.get(method) is not None and free[i] + seconds[method] <= budget:
            free[i] += seconds[method]
            finishing.append(method)
    return finishing


# ------------------------------------------------------------------------------- a table

def summarise(entry, run_dir, evals, method, evaluated=True):
    """The table's numbers, from the runs' own files."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    args = json.loads((run_dir / "args.json").read_text())
    epochs = [r for r in records if "step" not in r and r.get("epoch", 0) > 0]
    knn0 = [r["knn_top1"] for r in records if r.get("epoch") == 0 and "knn_top1" in r]
    speeds = [r["img_per_s"] for r in epochs if "img_per_s" in r]
    memory = [r["peak_gpu_mem_gib"] for r in epochs if "peak_gpu_mem_gib" in r]
    entry.update(epochs=epochs[-1]["epoch"], batch_size=args["batch_size"],
                 world_size=args["world_size"], knn_top1_init=knn0[0] if knn0 else None,
                 img_per_s=sum(speeds) / len(speeds) if speeds else None,
                 peak_gpu_mem_gib=max(memory) if memory else None,
                 status="done" if evaluated else "trained")
    if evaluated:
        knn = json.loads((evals / f"{method}-knn" / "result.json").read_text())
        linear = json.loads((evals / f"{method}-linear" / "result.json").read_text())
        entry.update(knn_top1=knn["knn_top1"], linear_top1=linear["top1"],
                     linear_top5=linear["top5"], linear_protocol=linear["protocol"],
                     linear_epochs=linear["epochs"])


def keep_records(run_dir, out, method):
    """OUT/records/<method>: the run's log.jsonl and args.json, small enough to keep with the
    results when the run folder (checkpoints) is not kept; the curves are drawn from them."""
    target = out / "records" / method
    target.mkdir(parents=True, exist_ok=True)
    for name in ("log.jsonl", "args.json"):
        shutil.copyfile(run_dir / name, target / name)
    return target


def run_table(args, settings, command, stop, deadline=None):
    """Fill (or resume) the table of args.out; returns (exit code, methods trained in this call)."""
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"methods": {}}
    if results.get("settings", settings) != settings:
        changed = [k for k in SETTINGS if results["settings"].get(k) != settings.get(k)]
        print(f"error: {args.out} holds a benchmark with other settings ({', '.join(changed)}): "
              f"choose another --out", file=sys.stderr)
        return 2, []
    revision = git_revision() or args.revision
    results.update(settings=settings, machine=machine(), git=revision,
                   date=datetime.date.today().isoformat(), command=command)

    def save():
        path.write_text(json.dumps(results, indent=2))

    work, evals = work_dir(args), work_dir(args) / "eval"
    finished_state = "trained" if args.train_only else "done"
    slots, per_method, measured_eval = args.parallel, None, None
    pending = []
    for method in args.methods:
        entry = results["methods"].setdefault(method, {})
        run_dir = work / "runs" / method
        if not run_dir.exists():
            if entry.get("status") in (finished_state, "done"):
                print(f"{method}: {entry['status']} (the row is kept: its run folder is not here)",
                      flush=True)
                continue
            entry.clear()  # a run that is not here starts again: its old times do not count
        entry.pop("status", None)  # a failure is retried
        pending.append(method)

    def todo_of(method):
        todo = steps(args, method)
        while todo and todo[0][2]():  # what is done is skipped (a resumed step is not done)
            print(f"{method}: {todo[0][0]} already done", flush=True)
            todo.pop(0)
        return todo

    todos = {m: todo_of(m) for m in pending}
    if args.time_budget and args.estimate_from and any(todos.values()):
        estimates, measured_eval = load_estimates(args, settings)
        budget = deadline - time.time()
        options = {}
        for k in sorted(k for k in estimates if k <= args.parallel):
            seconds = {m: estimate(args, m, [n for n, _, _ in todos[m]], estimates[k], results,
                                   measured_eval) for m in pending if todos[m]}
            options[k] = (plan([m for m in pending if todos[m]], seconds, budget, k), seconds)
        if options:  # the most rows; of equal plans, fewer side by side (less contention)
            slots = max(options, key=lambda k: (len(options[k][0]), -k))
            finishing, seconds = options[slots]
            per_method = estimates[slots]
            print(f"time budget {budget:.0f} s: {slots} side by side, expected to finish: "
                  f"{', '.join(finishing) or 'none'}" + "".join(
                      f"; {m} needs ~{seconds[m]:.0f} s" if seconds.get(m) else
                      f"; {m} was not measured" for m in pending
                      if todos[m] and m not in finishing), flush=True)
            if slots != args.parallel:  # the steps' share of the CPUs follows what runs at once
                args = copy.copy(args)
                args.parallel = slots
                todos = {m: steps(args, m)[len(steps(args, m)) - len(todo):]
                         for m, todo in todos.items()}  # the same steps, their new commands
        else:
            per_method = {}
            print(f"time budget: {args.estimate_from} measured nothing with at most "
                  f"{args.parallel} side by side: no training starts", flush=True)

    env, active, trained_now = child_env(args), [], []

    def finish(method):
        entry, run_dir = results["methods"][method], work / "runs" / method
        entry.setdefault("train_seconds", 0.0)
        summarise(entry, run_dir, evals, method, evaluated=not args.train_only)
        entry.update(git=revision, date=results["date"], gpus=results["machine"]["gpus"])
        entry["records"] = keep_records(run_dir, args.out, method).relative_to(args.out).as_posix()

    def begin(method):
        """Start the method's first step that is not done, or finish it if none is left."""
        entry, todo = results["methods"][method], todos[method]
        if not todo:
            finish(method)
            return None
        if per_method is not None:
            names = [n for n, _, _ in todo]
            need = estimate(args, method, names, per_method, results, measured_eval)
            left = deadline - time.time()
            if need is None or need > left:
                entry["status"] = (f"not started: {left / 60:.1f} min left of --time-budget, "
                                   + (f"needs ~{need / 60:.1f} min" if need else
                                      "no measured epoch time (--estimate-from)"))
                print(f"{method}: {entry['status']}", flush=True)
                return None
        chain = Chain(method, todo, entry, work / "runs" / method)
        chain.start(args, env, stop)
        return chain

    def end_step(chain, code, halted):
        """Book a finished step; start the chain's next one, or close the chain (False)."""
        halted = halted or ("a signal" if stop.signum else None)  # one that came meanwhile
        stop.procs.discard(chain.proc)
        chain.log.close()
        seconds, name, entry = time.time() - chain.started, chain.name, chain.entry
        entry[f"{name}_seconds"] = entry.get(f"{name}_seconds", 0.0) + seconds
        entry.setdefault("commands", {})[name] = shlex.join(chain.command)
        if name == "train":
            chain.read_epochs()  # the last records
            chain.record_speed(seconds)
        done = code == 0 and chain.todo[0][2]()
        speed = (f" ({entry['epoch_time']:.3g} s per epoch, {entry['side_by_side']} side by side)"
                 if name == "train" and entry.get("epoch_time") else "")
        if done:
            print(f"{chain.method}: {name} done in {seconds:.0f} s{speed}", flush=True)
            trained_now.extend([chain.method] if name == "train" else [])
            chain.todo.pop(0)
            while chain.todo and chain.todo[0][2]():
                print(f"{chain.method}: {chain.todo[0][0]} already done", flush=True)
                chain.todo.pop(0)
            if not chain.todo:
                finish(chain.method)
                return False
            if halted:
                entry["status"] = f"stopped before {chain.todo[0][0]} by {halted}"
                return False
            chain.start(args, env, stop)
            return True
        # a step that ends unfinished while the benchmark stops was stopped by it (its SIGTERM
        # may have come from the signal handler); a training that exits 0 before its last
        # epoch was stopped by a signal of its own: both saved what they had
        why = chain.stopped or halted or ("a signal" if code == 0 and name == "train" else None)
        if why:
            epoch, batch = trained_epochs(chain.run_dir)
            where = (f" after {epoch} of {args.epochs} epochs" + (f" and {batch} steps" if batch
                                                                  else "")
                     if name == "train" else "")
            entry["status"] = f"stopped during {name}{where} by {why} (a second call resumes it)"
            print(f"{chain.method}: {name} stopped in {seconds:.0f} s{speed}", flush=True)
            return False
        log = args.out / "logs" / f"{chain.method}.{name}.log"
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:]
        entry["status"] = f"failed at {name} (exit {code}): {last[0][:200] if last else ''}"
        print(f"{chain.method}: {name} FAILED in {seconds:.0f} s", flush=True)
        return False

    announced = False
    while pending or active:
        late = deadline is not None and time.time() >= deadline
        halted = "a signal" if stop.signum else "the time budget" if late else None
        if halted and active and not announced:
            print(f"stopped by {halted}: SIGTERM to the running steps "
                  f"({', '.join(f'{c.method} {c.name}, pid {c.proc.pid}' for c in active)}); "
                  f"each saves and exits", flush=True)
            announced = True
        while pending and len(active) < slots and not halted:
            chain = begin(pending.pop(0))
            save()
            if chain:
                active.append(chain)
        for method in pending if halted else []:
            results["methods"][method]["status"] = f"not started: stopped by {halted}"
        if halted:
            pending = []
        if not active:
            break
        time.sleep(POLL)
        training = sum(c.name == "train" for c in active)
        for chain in list(active):
            if chain.name == "train":
                chain.together.append(training)
            code = chain.poll()
            if code is None:
                if halted:
                    chain.halt(halted)
                if late and time.time() > deadline + GRACE_SECONDS:
                    chain.proc.kill()
                continue
            if not end_step(chain, code, halted):
                active.remove(chain)
            save()

    finished = [m for m in args.methods if results["methods"][m].get("status") == finished_state]
    drawable = [args.out / results["methods"][m]["records"] for m in finished
                if results["methods"][m].get("records")]
    if drawable and not args.train_only and args.epochs >= 3:  # fewer: points, not curves
        try:
            plot.draw(plot.collect(drawable), args.out / "curves.png", f"{args.data}, {args.arch}")
            results["curves"] = "curves.png"
        except plot.PlotError as e:
            print(f"no figure: {e}")
    save()
    (args.out / "results.md").write_text(markdown(results))
    print((args.out / "results.md").read_text())
    code = 1 if len(finished) < len(args.methods) else 0
    return (128 + stop.signum if stop.signum else code), trained_now


def machine():
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = re.findall(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": f"{cpu}, {os.cpu_count()} CPUs", "memory_gib": round(memory, 1),
            "gpus": gpus, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "cuda": torch.version.cuda}


def git_revision():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                             capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=10).stdout
        return rev + ("+uncommitted" if dirty.strip() else "") if rev else None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------- speed tests

SPEED_KEYS = ("status", "epochs", "epoch_time", "epoch_wall", "train_overhead_seconds",
              "train_seconds", "side_by_side", "side_by_side_mean", "epochs_timed", "img_per_s",
              "peak_gpu_mem_gib")


def speed_test(args, settings, command, stop, deadline):
    """Every method trained args.epochs epochs with K side by side, for each K of --speed-test,
    each K in its own benchmark folder OUT/parallel-K (resumable as any; its run folders in
    OUT/runs/parallel-K, or under --runs-dir); OUT/speed.json and
    OUT/speed.md put the epoch times side by side."""
    path = args.out / "speed.json"
    speed = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    codes = []
    for k in args.speed_test:
        sub = copy.copy(args)
        sub.out, sub.parallel, sub.train_only = args.out / f"parallel-{k}", k, True
        # the run folders under OUT/runs/ (which git ignores), or --runs-dir
        sub.runs_dir = (args.runs_dir or args.out / "runs") / f"parallel-{k}"
        start = time.time()
        code, trained_now = run_table(sub, settings, command, stop, deadline)
        codes.append(code)
        if code == 2:  # other settings: refused
            return 2
        methods = json.loads((sub.out / "results.json").read_text())["methods"]
        run = speed["runs"].setdefault(str(k), {})
        # CPU threads of each process: on a CPU they decide what side by side means
        run["threads"] = child_env(sub).get("OMP_NUM_THREADS", "torch's default")
        run["methods"] = {m: {key: methods[m].get(key) for key in SPEED_KEYS}
                          for m in args.methods if m in methods}
        if sorted(trained_now) == sorted(args.methods):  # all of it in this call: comparable
            run["wall_seconds"] = time.time() - start
        if trained_now or "settings" not in speed:  # where and when it was measured
            speed.update(settings=settings, epochs=args.epochs, machine=machine(),
                         git=git_revision() or args.revision,
                         date=datetime.date.today().isoformat(), command=command)
        path.write_text(json.dumps(speed, indent=2))
        (args.out / "speed.md").write_text(speed_markdown(speed))
        if stop.signum:
            break
    # what the evaluations add to a row: those of the first method, trained alone, once
    first, sub.out = args.methods[0], args.out / f"parallel-{args.speed_test[0]}"
    sub.runs_dir = (args.runs_dir or args.out / "runs") / f"parallel-{args.speed_test[0]}"
    done = sub.out / "results.json"
    rows = json.loads(done.read_text())["methods"] if done.exists() else {}
    if (not stop.signum and "eval_seconds" not in speed
            and rows.get(first, {}).get("status") == "trained"):
        sub.methods, sub.parallel, sub.train_only = [first], 1, False
        codes.append(run_table(sub, settings, command, stop, deadline)[0])
        row = json.loads((sub.out / "results.json").read_text())["methods"][first]
        if row.get("status") == "done":
            speed.update(eval_seconds=row["knn_seconds"] + row["linear_seconds"],
                         eval_method=first)
            path.write_text(json.dumps(speed, indent=2))
            (args.out / "speed.md").write_text(speed_markdown(speed))
    print((args.out / "speed.md").read_text())
    return max(codes) if codes else 1


def speed_markdown(speed, epochs=200):
    """speed.md: per method, the epoch time and the wall time per epoch for each K side by side;
    what K side by side gains; the estimated time of all rows of an `epochs`-epoch table."""
    s, m = speed["settings"], speed["machine"]
    ks = sorted(speed["runs"], key=int)
    methods = [x for x in s["methods"] if any(x in speed["runs"][k]["methods"] for k in ks)]
    lines = [f"{s['data']}; {s['arch']}, batch {s['batch_size'] or 'of each recipe'}"
             + (f", {s['img_size']} px" if s.get("img_size") else "")
             + (f", {' '.join(s['extra'])}" if s["extra"] else "")
             + f"; {speed['epochs']} epochs per run. {', '.join(m['gpus']) or 'No GPU'}, "
               f"{m['cpu']}; {speed['date']}, revision {speed['git']}.", "",
             "Seconds per epoch: the training's own `epoch_time` (median, the first epoch left "
             "out) and, in brackets, the wall-clock time per epoch (checkpoint included).", "",
             "| Method | " + " | ".join("alone" if k == "1" else f"{k} side by side" for k in ks)
             + " |", "|---" * (len(ks) + 1) + "|"]

    def get(k, method, key):
        return speed["runs"][k]["methods"].get(method, {}).get(key)

    for method in methods:
        cells = []
        for k in ks:
            t, wall = get(k, method, "epoch_time"), get(k, method, "epoch_wall")
            alone = get("1", method, "epoch_time") if k != "1" and "1" in ks else None
            ran = get(k, method, "side_by_side_mean")  # the last of a run had fewer beside it
            cells.append(f"{fmt(t, ' s', 2)} ({fmt(wall, ' s', 2)})"
                         + (f", {t / alone:.2f}x alone" if t and alone else "")
                         + (f", {ran:.1f} side by side on average" if t and ran is not None
                            and ran < int(k) - 0.05 else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if "1" in ks:  # throughput: K trainings advance at once, each at its side-by-side speed
        gains = []
        for k in ks:
            both = [x for x in methods if get(k, x, "epoch_time") and get("1", x, "epoch_time")
                    and (get(k, x, "side_by_side_mean") or 1) >= int(k) - 0.05]
            gain = (int(k) * sum(get("1", x, "epoch_time") for x in both)
                    / sum(get(k, x, "epoch_time") for x in both)) if both else None
            gains.append(fmt(gain, "x", 2))
        lines.append("| epochs per second, relative to alone | " + " | ".join(gains) + " |")
    if not m["gpus"]:
        lines.append("| CPU threads per process (OMP_NUM_THREADS) | " + " | ".join(
            str(speed["runs"][k].get("threads", "–")) for k in ks) + " |")
    walls = [fmt(speed["runs"][k].get("wall_seconds"), " s", 0) for k in ks]
    lines.append("| the whole run, wall-clock | " + " | ".join(walls) + " |")
    costs = []
    for k in ks:
        per = {x: (get(k, x, "train_overhead_seconds") or 0) + epochs * get(k, x, "epoch_wall")
               for x in methods if get(k, x, "epoch_wall")}
        if len(per) < len(methods):
            costs.append("–")
            continue
        free = [0.0] * int(k)  # the methods in order, each in the first slot to free up
        for x in methods:
            i = min(range(int(k)), key=free.__getitem__)
            free[i] += per[x]
        costs.append(f"{max(free) / 60:.1f} min (longest row {max(per.values()) / 60:.1f})")
    lines.append(f"| {epochs}-epoch training of every row, estimated | " + " | ".join(costs) + " |")
    if speed.get("eval_seconds"):
        lines += ["", f"A row's evaluation (kNN, then the linear probe; {speed['eval_method']}'s, "
                      f"alone) took {speed['eval_seconds']:.0f} s."]
    lines += ["", "Epochs per second with K side by side: K x the epoch times alone / the epoch "
                  "times side by side, over the methods that had K - 1 others beside them "
                  "(nearly) throughout. Estimates: start-up and kNN monitor as measured, plus "
                  f"{epochs} x the wall time per epoch, each method in the first slot to free "
                  "up; the evaluations are not included.", "",
              f"Command: `{speed['command']}`"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------- the table

def fmt(value, unit="", digits=1):
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def markdown(results, folder="", methods=None):
    """results.md: the table (of `methods` only, if given), then what made it."""
    s, m = results["settings"], results["machine"]
    data = s["data"] + "".join(f", the first {s[k]} {split} images of each class"
                               for k, split in (("train_per_class", "train"),
                                                ("val_per_class", "val")) if s.get(k))
    details = [f"{s['img_size']} px" if s.get("img_size") else "",
               f"batch {s['batch_size']}" if s["batch_size"] else "",
               f"{s['nproc_per_node']} processes" if s["nproc_per_node"] > 1 else "",
               " ".join(s["extra"])]
    hardware = ", ".join(m["gpus"]) or "No GPU"
    lines = [f"{data}; {s['arch']}, {s['epochs']} epoch{'s' * (s['epochs'] != 1)}"
             + "".join(f", {d}" for d in details if d) + f"; linear probe: {s['linear']}. "
             f"{hardware}, {m['cpu']}; {results['date']}, revision {results['git']}.", "",
             "| Method | Epochs | Batch | kNN top-1, random init | kNN top-1 | Linear top-1 | "
             "Linear top-5 | Training time | img/s |" + (" Peak GPU memory |" if m["gpus"] else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if m["gpus"] else "")]
    rows = [(method, e) for method, e in results["methods"].items()
            if not methods or method in methods]
    for method, e in rows:
        if e.get("status") != "done":
            lines.append(f"| {method} | {e.get('status', 'not run')} ||||||||"
                         + ("|" if m["gpus"] else ""))
            continue
        lines.append(f"| {method} | {e['epochs']} | {e['batch_size']} | "
                     f"{fmt(e['knn_top1_init'])} | {fmt(e['knn_top1'])} | "
                     f"{fmt(e['linear_top1'])} | {fmt(e['linear_top5'])} | "
                     f"{fmt(e['train_seconds'] / 60, ' min')} | {fmt(e['img_per_s'])} |"
                     + (f" {fmt(e['peak_gpu_mem_gib'], ' GiB', 2)} |" if m["gpus"] else ""))
    # rows made in other calls (other machines, other revisions) say so
    other = [f"{method}: revision {e['git']}, {e['date']}" + (f", {', '.join(e['gpus'])}"
                                                              if e.get("gpus") else "")
             for method, e in rows if e.get("status") == "done" and "git" in e
             and (e["git"], e["date"], e.get("gpus")) != (results["git"], results["date"],
                                                          m["gpus"])]
    if other:
        lines += ["", "Rows made in earlier calls: " + "; ".join(other) + "."]
    timed = [(method, e) for method, e in rows if e.get("epoch_time") is not None]
    if timed:
        table = []
        for method, e in timed:
            evals = (e["knn_seconds"] + e["linear_seconds"] if "knn_seconds" in e
                     and "linear_seconds" in e else None)
            mean = e.get("side_by_side_mean")
            together = f"{e.get('side_by_side', '–')}" + (
                f" ({mean:.1f} on average)" if mean and mean < e["side_by_side"] - 0.05 else "")
            table.append([method, together, fmt(e["epoch_time"], " s", 2),
                          fmt(e.get("epoch_wall"), " s", 2),
                          fmt(e.get("train_overhead_seconds"), " s", 0), fmt(evals, " s", 0)])
        head = ["Method", "Trained side by side", "Epoch time", "Wall time per epoch",
                "Start-up, kNN monitor, end", "kNN + linear evaluation"]
        # a column nobody measured (one epoch has no epoch-to-epoch wall time) is left out
        keep = [c for c in range(len(head)) if any(row[c] != "–" for row in table)]
        lines += ["", "| " + " | ".join(head[c] for c in keep) + " |", "|---" * len(keep) + "|"]
        lines += ["| " + " | ".join(row[c] for c in keep) + " |" for row in table]
    lines += ["", f"Command: `{results['command']}`"]
    if results.get("curves"):
        lines += ["", f"![training curves]({Path(folder) / results['curves']})"]
    return "\n".join(lines) + "\n"


def render_readme(page):
    """Replace every block <!-- results: FOLDER --> ... <!-- /results --> of a Markdown page by
    the table rendered from FOLDER/results.json (FOLDER relative to the page; `methods=a,b` after
    it keeps those rows only), and rewrite FOLDER/results.md."""
    text = page.read_text()

    def table(match):
        folder, methods = match.group(1), match.group(2)
        results = json.loads((page.parent / folder / "results.json").read_text())
        (page.parent / folder / "results.md").write_text(markdown(results))
        methods = methods.split(",") if methods else None
        unknown = sorted(set(methods or []) - set(results["methods"]))
        if unknown:
            raise SystemExit(f"error: {page}: no {', '.join(unknown)} in {folder}/results.json")
        return (match.group(0).split("\n")[0] + "\n" + markdown(results, folder, methods)
                + "<!-- /results -->")

    page.write_text(re.sub(r"<!-- results: (\S+?)(?: methods=(\S+))? -->.*?<!-- /results -->",
                           table, text, flags=re.S))


# ------------------------------------------------------------------------------- main

def settings_of(args):
    """What makes two calls the same benchmark (SETTINGS), as results.json records it."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k in SETTINGS}


def main(argv=None):
    args = get_args(argv)
    if args.render_readme:
        for page in args.render_readme:
            render_readme(page)
            print(f"rendered the results tables of {page}")
        return 0
    deadline = time.time() + args.time_budget if args.time_budget else None
    args.out.mkdir(parents=True, exist_ok=True)
    settings = settings_of(args)
    if args.train_per_class or args.val_per_class:
        args.data = str(subset(args.data, args.out / "data", {"train": args.train_per_class,
                                                              "val": args.val_per_class}))
    command = shlex.join(["python", *sys.argv] if argv is None
                         else ["python", "tools/benchmark.py", *argv])
    with Stop() as stop:
        if args.speed_test:
            return speed_test(args, settings, command, stop, deadline)
        return run_table(args, settings, command, stop, deadline)[0]


if __name__ == "__main__":
    sys.exit(main())
