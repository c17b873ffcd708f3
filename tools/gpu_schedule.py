"""Methods side by side on one device, within a time budget, and the speed tests that size both:
the scheduling of short GPU sessions (tools/gpu_window.sh) around tools/benchmark.py's table.

    python tools/gpu_schedule.py <tools/benchmark.py's flags> --parallel 4 -- --data-on-device
    python tools/gpu_schedule.py ... --epochs 4 --speed-test 1,2,4 --out results/speed
    python tools/gpu_schedule.py ... --parallel 2 --time-budget 500 --estimate-from results/speed
    python tools/gpu_schedule.py ... --out TABLE --time-budget 570 --choose TABLE/speed TABLE/fast

--parallel N runs up to N methods at once, each in its own processes (its training, then its
evaluations), all on the same device: one small model rarely fills a large GPU. The table is the
one tools/benchmark.py fills one step after another (the same commands, folders and results.json;
either resumes the other's); only the timings differ, and this adds them to each row: the
wall-clock time per epoch (the checkpoint included), the time besides the epochs (start-up, kNN
monitor, end) and how many trained side by side. --speed-test K,K,... trains every method a few
epochs with K side by side for each K (train only) and tabulates the epoch times (OUT/speed.md),
so that the best N can be chosen. --time-budget bounds a call: with --estimate-from (a speed test
of the same settings) a method starts only if its estimated time fits, and whatever still runs at
the end is stopped and saved. --choose prints the speed test (folder, then its flags for the
methods) whose estimates fit the most rows of the table in --time-budget seconds: the table's own,
once it has rows.
"""
import copy
import functools
import json
import math
import os
import shlex
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repo's modules

from common.args import git_revision  # noqa: E402
from tools import benchmark  # noqa: E402

# a speed test measures the same runs, shorter and possibly of fewer methods
SPEED_SETTINGS = tuple(k for k in benchmark.SETTINGS if k not in ("epochs", "methods"))
SPEED_KEYS = ("status", "epochs", "epoch_time", "epoch_wall", "train_overhead_seconds",
              "train_seconds", "side_by_side", "side_by_side_mean", "epochs_timed", "img_per_s",
              "peak_gpu_mem_gib")
POLL = 0.05  # seconds between two looks at the running steps
# The time of a row's kNN and linear evaluation until a speed test (which times the first
# method's) or a row of the table has measured it: generous for CIFAR on a GPU.
EVAL_GUESS_SECONDS = 120.0
MARGIN = 1.1  # estimates are stretched by this factor before they are compared with the budget
# After the time budget's SIGTERM, a step has this long to save and exit before it is killed: the
# call must end before whatever bounds it from outside does.
GRACE_SECONDS = 30


def get_args(argv=None):
    """tools/benchmark.py's arguments and the scheduling's, checked."""
    p = benchmark.parser()
    p.description = __doc__.split("\n")[0]
    g = p.add_argument_group("scheduling")
    g.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="train up to N methods at once, side by side on the same device, each "
                        "then evaluated in its slot (1: one after another)")
    g.add_argument("--speed-test", metavar="K,K,...", help="measure instead of filling the "
                   "table: train every method --epochs epochs (no evaluation) with K methods side "
                   "by side, for each K, in OUT/parallel-K; tabulate the epoch times in "
                   "OUT/speed.md and OUT/speed.json")
    g.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="end this call within SECONDS: with --estimate-from, a method starts only "
                        "if its estimated time fits in what is left; whatever still runs at the "
                        "end is stopped (it saves its checkpoint)")
    g.add_argument("--estimate-from", type=Path, metavar="FOLDER", help="a --speed-test folder "
                   "of the same settings (other --epochs and --methods allowed): the epoch times "
                   "and start-up costs that --time-budget's estimates come from; with several K "
                   "measured, the number side by side (up to --parallel) that fits the most rows "
                   "is chosen")
    g.add_argument("--choose", type=Path, nargs="+", metavar="FOLDER", help="only print the "
                   "--speed-test folder, a tab, and its flags for the methods: the one whose "
                   "estimates fit the most rows of --out's table in --time-budget seconds, or the "
                   "one of the table's flags once it has rows (nothing where none fits)")
    args = benchmark.get_args(argv, p)
    try:
        args.speed_test = [int(k) for k in args.speed_test.split(",")] if args.speed_test else None
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
    if (args.estimate_from or args.choose) and not args.time_budget:
        p.error("--estimate-from and --choose serve --time-budget: give it too")
    return args


def side_by_side(args, slots):
    """The arguments and environment of the steps when `slots` methods run side by side: each
    process gets its share of the CPUs, as loader workers (the scripts' default, CPUs - 1, is per
    process) and as threads (torch's default, every core per process, makes N fight over them)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args, env = copy.copy(args), dict(os.environ)
    if slots > 1:
        args.workers = max(1, cpus // slots - 1) if args.workers is None else args.workers
        env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // slots)))
    return args, env


class EpochClock:
    """The end-of-epoch records a training appends to its log.jsonl, each with the moment it was
    first seen: their intervals are the wall-clock time per epoch, the checkpoint written after
    each epoch included. What the file holds at the start is not this process's. A resumed run
    first replaces log.jsonl by a file without the records after its checkpoint (common/log.py,
    `keep_until`), shorter than the one read so far: so the position read up to is kept with the
    file it is in, another file or a shorter one is read from its start, and only whole lines of
    the epochs after the checkpoint's (and after those seen) are timed."""

    def __init__(self, run_dir):
        self.path, self.seen = run_dir / "log.jsonl", []
        self.last_epoch = benchmark.trained_epochs(run_dir)[0]
        try:
            stat = self.path.stat()
            self.file, self.offset = (stat.st_dev, stat.st_ino), stat.st_size
        except FileNotFoundError:
            self.file, self.offset = None, 0

    def read(self):
        """Time the records the training logged since the last look."""
        try:
            with open(self.path, "rb") as f:
                stat = os.fstat(f.fileno())  # of the file opened: no replacement slips in between
                if (stat.st_dev, stat.st_ino) != self.file or stat.st_size < self.offset:
                    self.file, self.offset = (stat.st_dev, stat.st_ino), 0
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        now, end = time.time(), data.rfind(b"\n") + 1  # complete lines only
        self.offset += end
        for line in data[:end].splitlines():
            record = json.loads(line)
            if "step" not in record and record.get("epoch", 0) > self.last_epoch:
                self.last_epoch = record["epoch"]
                self.seen.append((now, record))

    def speed(self, seconds, together):
        """Wall-clock seconds per epoch (median between two end-of-epoch records; not those that
        include the kNN monitor), the rest of the training's `seconds` (start-up, data loading,
        kNN monitor, end), and the most trainings that ran at once while it trained (`together`:
        at each look), and how many on average."""
        wall = [t1 - t0 for (t0, _), (t1, r1) in zip(self.seen, self.seen[1:])
                if "knn_top1" not in r1]
        wall = statistics.median(wall) if wall else None
        return dict(epoch_wall=wall, side_by_side=max(together, default=1),
                    side_by_side_mean=round(statistics.fmean(together), 2) if together else 1,
                    epochs_timed=len(self.seen),
                    train_overhead_seconds=seconds - len(self.seen) * wall if wall else None)


class Chain:
    """A method's steps still to do (`todo`, as benchmark.steps gives them), one after another in
    one slot; its training timed by an EpochClock."""

    def __init__(self, args, method, todo, entry, env, stop):
        self.args, self.method, self.todo, self.entry = args, method, todo, entry
        self.env, self.stop = env, stop
        self.stopped, self.trained = None, False  # why it was stopped; whether it trained now
        self.start()

    def start(self):
        """Start the first step of `todo` (its clock before it: the log as it was)."""
        train = self.todo[0][0] == "train"
        self.clock = EpochClock(self.args.runs_dir / "runs" / self.method) if train else None
        self.together = []  # trainings running at each look, this one included
        self.step = benchmark.Step(self.args, self.method, self.todo[0], self.env, self.stop)

    def poll(self, training):
        """The step's exit code, None while it runs; `training`: trainings running now."""
        if self.clock:
            self.together.append(training)
            self.clock.read()
        return self.step.proc.poll()

    def halt(self, why):
        """Send SIGTERM (a training saves and exits at its next step)."""
        if self.stopped is None and self.step.proc.poll() is None:
            self.stopped = why
            self.step.proc.send_signal(signal.SIGTERM)

    def end(self, results, code, halted):
        """Book the step that ended; start the chain's next one (True) or close it (False)."""
        halted = halted or ("a signal" if self.stop.signum else None)  # one that came meanwhile
        note = ""
        if self.clock:
            self.clock.read()  # the last records
            self.entry.update(self.clock.speed(time.time() - self.step.started, self.together))
            if self.entry["epoch_wall"]:
                note = (f" ({self.entry['epoch_wall']:.3g} s per epoch, "
                        f"{self.entry['side_by_side']} side by side)")
        if not self.step.end(self.args, self.entry, code, self.stopped or halted, note):
            return False
        self.trained = self.trained or self.step.name == "train"
        self.todo = benchmark.skip_done(self.method, self.todo[1:])
        if not self.todo:
            benchmark.finish_row(self.args, results, self.method)
        elif halted:
            self.entry["status"] = f"stopped before {self.todo[0][0]} by {halted}"
        else:
            self.start()
        return bool(self.todo) and not halted


def run_side_by_side(args, settings, command, stop, deadline=None):
    """Fill (or resume) the table of args.out as tools/benchmark.py does, up to args.parallel
    methods at once; returns (exit code, methods trained in this call). At `deadline` (a
    time.time()) the running steps are stopped; with --estimate-from, only what fits starts."""
    results, methods = benchmark.open_table(args, settings, command)
    if results is None:
        return 2, []
    todos = {m: [name for name, _, _ in benchmark.skip_done(m, benchmark.steps(args, m))]
             for m in methods}
    slots, admit = args.parallel, None
    if args.estimate_from and deadline and any(todos.values()):
        slots, admit = plan_budget(args, settings, results, todos, deadline)
    run_args, env = side_by_side(args, slots)
    active, trained_now, announced = [], [], False
    while methods or active:
        late = deadline is not None and time.time() >= deadline
        halted = "a signal" if stop.signum else "the time budget" if late else None
        if halted and active and not announced:
            running = [f"{c.method} {c.step.name}, pid {c.step.proc.pid}" for c in active]
            print(f"stopped by {halted}: SIGTERM to the running steps ({', '.join(running)}); "
                  f"each saves and exits", flush=True)
            announced = True
        while methods and len(active) < slots and not halted:
            method, methods = methods[0], methods[1:]
            chain = begin(run_args, results, method, todos[method], admit, env, stop)
            active += [chain] if chain else []
            benchmark.save(args, results)
        for method in methods if halted else []:
            results["methods"][method]["status"] = f"not started: stopped by {halted}"
        methods = [] if halted else methods
        time.sleep(POLL if active else 0)
        training = sum(c.step.name == "train" for c in active)
        for chain in list(active):
            code = chain.poll(training)
            if code is None and halted:
                chain.halt(halted)
            if code is None and late and time.time() > deadline + GRACE_SECONDS:
                chain.step.proc.kill()
            if code is not None and not chain.end(results, code, halted):
                active.remove(chain)
                trained_now += [chain.method] if chain.trained else []
            if code is not None:
                benchmark.save(args, results)
    return benchmark.close_table(args, results, stop), trained_now


def begin(args, results, method, names, admit, env, stop):
    """Start the method's steps `names` (those not done), or finish its row if none is left; None
    where nothing starts, also where `admit(method, names, results)` says why not."""
    if not names:
        benchmark.finish_row(args, results, method)
        return None
    refusal = admit(method, names, results) if admit else None
    if refusal:
        results["methods"][method]["status"] = refusal
        print(f"{method}: {refusal}", flush=True)
        return None
    todo = [step for step in benchmark.steps(args, method) if step[0] in names]
    return Chain(args, method, todo, results["methods"][method], env, stop)


# ------------------------------------------------------------------------------- estimates

def load_estimates(folder, settings, compared=SPEED_SETTINGS):
    """{K: {method: (seconds besides the epochs, wall seconds per epoch)}} of a speed test,
    measured with K methods side by side, the evaluation's seconds it measured (None if it did
    not), and its flags for the methods; refused where its settings (`compared`) differ."""
    path = folder / "speed.json"
    if not path.exists():
        raise SystemExit(f"error: {folder}: no speed.json (made by --speed-test)")
    speed = json.loads(path.read_text())
    changed = [k for k in compared if speed["settings"].get(k) != settings.get(k)]
    if changed:
        raise SystemExit(f"error: {folder} was measured with other settings "
                         f"({', '.join(changed)})")
    return ({int(k): {m: (e["train_overhead_seconds"], e["epoch_wall"])
                      for m, e in run["methods"].items()
                      if e.get("epoch_wall") and e.get("train_overhead_seconds") is not None}
             for k, run in speed["runs"].items()}, speed.get("eval_seconds"),
            speed["settings"]["extra"])


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
        epoch, _ = benchmark.trained_epochs(args.runs_dir / "runs" / method)
        seconds += overhead + (args.epochs - epoch) * wall
    if any(n != "train" for n in names):
        seconds += eval_seconds(results, measured_eval)
    return seconds * MARGIN


def plan(order, seconds, budget, slots):
    """The methods of `order` that finish within `budget` when each starts, in order, in the
    first of `slots` to free up, and only if its time (`seconds[method]`, None if unknown) fits
    in what is left then: the rule `run_side_by_side` follows, simulated; and when the last
    ends (math.inf for `budget`: the time of them all)."""
    free, finishing = [0.0] * slots, []
    for method in order:
        i = min(range(slots), key=free.__getitem__)
        if seconds.get(method) is not None and free[i] + seconds[method] <= budget:
            free[i] += seconds[method]
            finishing.append(method)
    return finishing, max(free)


def fits(args, results, todos, budget, estimates, measured_eval):
    """{K: (the methods expected to finish, their estimated seconds)} for each K side by side
    measured, up to --parallel."""
    order = [m for m in todos if todos[m]]
    found = {}
    for k in sorted(k for k in estimates if k <= args.parallel):
        seconds = {m: estimate(args, m, todos[m], estimates[k], results, measured_eval)
                   for m in order}
        found[k] = (plan(order, seconds, budget, k)[0], seconds)
    return found


def plan_budget(args, settings, results, todos, deadline):
    """How many side by side (the most rows; of equal plans, fewer side by side: less
    contention) and the rule for each start (`refusal`), from --estimate-from's speed test."""
    estimates, measured_eval, _ = load_estimates(args.estimate_from, settings)
    budget = deadline - time.time()
    found = fits(args, results, todos, budget, estimates, measured_eval)
    if not found:
        print(f"time budget: {args.estimate_from} measured nothing with at most {args.parallel} "
              f"side by side: no training starts", flush=True)
        return args.parallel, functools.partial(refusal, args, {}, None, deadline)
    slots = max(found, key=lambda k: (len(found[k][0]), -k))
    finishing, seconds = found[slots]
    print(f"time budget {budget:.0f} s: {slots} side by side, expected to finish: "
          f"{', '.join(finishing) or 'none'}" + "".join(
              f"; {m} needs ~{seconds[m]:.0f} s" if seconds.get(m) else
              f"; {m} was not measured" for m in seconds if m not in finishing), flush=True)
    return slots, functools.partial(refusal, args, estimates[slots], measured_eval, deadline)


def refusal(args, per_method, measured_eval, deadline, method, names, results):
    """Why `method` may not start its steps `names` now (None: it may): its estimate does not
    fit in what is left of the time budget, or was not measured."""
    need = estimate(args, method, names, per_method, results, measured_eval)
    left = deadline - time.time()
    if need is None or need > left:
        return (f"not started: {left / 60:.1f} min left of --time-budget, "
                + (f"needs ~{need / 60:.1f} min" if need else
                   "no measured epoch time (--estimate-from)"))
    return None


def choose(args, settings):
    """(folder, flags for the methods) of the speed test of --choose whose estimates fit the most
    rows of a table of every method of --methods, each trained from its start, in --time-budget
    seconds (the first of equal ones); where --out's table has rows, the one of its flags."""
    path = args.out / "results.json"
    fixed = json.loads(path.read_text())["settings"]["extra"] if path.exists() else None
    best, compared = (0, "", []), [k for k in SPEED_SETTINGS if k != "extra"]
    for folder in [f for f in args.choose if (f / "speed.json").exists()]:
        estimates, measured_eval, extra = load_estimates(folder, settings, compared)
        if fixed is not None:
            best = (1, folder, extra) if extra == fixed else best
            continue
        for k, per_method in estimates.items():
            if set(args.methods) - set(per_method):  # not finished: no basis for a choice
                continue
            seconds = {m: estimate(args, m, ["train", "knn", "linear"], per_method,
                                   {"methods": {}}, measured_eval) for m in args.methods}
            rows = len(plan(args.methods, seconds, args.time_budget, k)[0])
            best = (rows, folder, extra) if rows > best[0] else best
    return best[1], best[2]


# ------------------------------------------------------------------------------- speed tests

def speed_test(args, settings, command, stop, deadline):
    """Every method trained args.epochs epochs with K side by side, for each K of --speed-test,
    each K in its own benchmark folder OUT/parallel-K (resumable as any; its run folders in
    OUT/runs/parallel-K, or under --runs-dir); OUT/speed.json and OUT/speed.md put the epoch
    times side by side."""
    path = args.out / "speed.json"
    speed = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    # the run folders under OUT/runs/ (which git ignores), or --runs-dir
    runs = args.out / "runs" if args.runs_dir == args.out else args.runs_dir
    sub, codes = copy.copy(args), []
    for k in args.speed_test:
        sub.out, sub.runs_dir, sub.parallel = args.out / f"parallel-{k}", runs / f"parallel-{k}", k
        sub.train_only, start = True, time.time()
        code, trained_now = run_side_by_side(sub, settings, command, stop, deadline)
        codes.append(code)
        if code == 2:  # other settings: refused
            return 2
        methods = json.loads((sub.out / "results.json").read_text())["methods"]
        run = speed["runs"].setdefault(str(k), {})
        # CPU threads of each process: on a CPU they decide what side by side means
        run["threads"] = side_by_side(sub, k)[1].get("OMP_NUM_THREADS", "torch's default")
        run["methods"] = {m: {key: methods[m].get(key) for key in SPEED_KEYS}
                          for m in args.methods if m in methods}
        if sorted(trained_now) == sorted(args.methods):  # all of it in this call: comparable
            run["wall_seconds"] = time.time() - start
        if trained_now or "settings" not in speed:  # where and when it was measured
            speed.update(settings=settings, epochs=args.epochs, machine=benchmark.machine(),
                         git=git_revision(short=True) or args.revision,
                         date=time.strftime("%Y-%m-%d"), command=command)
        write_speed(args.out, speed)
        if stop.signum:
            break
    # what the evaluations add to a row: those of the first method, trained alone, once
    first, k = args.methods[0], args.speed_test[0]
    sub.out, sub.runs_dir = args.out / f"parallel-{k}", runs / f"parallel-{k}"
    done = sub.out / "results.json"
    rows = json.loads(done.read_text())["methods"] if done.exists() else {}
    if (not stop.signum and "eval_seconds" not in speed
            and rows.get(first, {}).get("status") == "trained"):
        sub.methods, sub.parallel, sub.train_only = [first], 1, False
        codes.append(run_side_by_side(sub, settings, command, stop, deadline)[0])
        row = json.loads(done.read_text())["methods"][first]
        if row.get("status") == "done":
            speed.update(eval_seconds=row["knn_seconds"] + row["linear_seconds"],
                         eval_method=first)
            write_speed(args.out, speed)
    print((args.out / "speed.md").read_text())
    return max(codes) if codes else 1


def write_speed(out, speed):
    """OUT/speed.json and OUT/speed.md."""
    (out / "speed.json").write_text(json.dumps(speed, indent=2))
    (out / "speed.md").write_text(speed_markdown(speed))


def speed_markdown(speed, epochs=200):
    """speed.md: per method, the epoch time and the wall time per epoch for each K side by side;
    what K side by side gains; the estimated time of all rows of an `epochs`-epoch table."""
    s, m, fmt = speed["settings"], speed["machine"], benchmark.fmt
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
        end = plan(methods, per, math.inf, int(k))[1]  # each in the first slot to free up
        costs.append(f"{end / 60:.1f} min (longest row {max(per.values()) / 60:.1f})"
                     if len(per) == len(methods) else "–")
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


def main(argv=None):
    """Fill the table side by side, run the speed tests, or choose a speed test; the exit code."""
    args = get_args(argv)
    if args.render_readme:
        return benchmark.main(argv)
    deadline = time.time() + args.time_budget if args.time_budget else None
    settings = benchmark.prepare(args)
    if args.choose:
        folder, flags = choose(args, settings)
        print(f"{folder}\t{shlex.join(flags)}")
        return 0
    command = shlex.join(["python", *sys.argv] if argv is None else
                         ["python", "tools/gpu_schedule.py", *argv])
    with benchmark.stopping() as stop:
        if args.speed_test:
            return speed_test(args, settings, command, stop, deadline)
        return run_side_by_side(args, settings, command, stop, deadline)[0]


if __name__ == "__main__":
    sys.exit(main())
