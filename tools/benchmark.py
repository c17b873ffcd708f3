"""One command for a results table: train every method, evaluate every backbone, write the table.

    python tools/benchmark.py --data cifar10 --methods all --arch resnet18 --epochs 200 \\
        --out results/cifar10-200ep -- --precision bf16      # flags after -- go to every method
    python tools/benchmark.py --render-readme README.md docs/*.md   # refresh the pages' tables

Each method trains with its own script, linear_eval.py evaluates it (kNN, linear probe); a second
call with the same --out resumes what is not done; Ctrl-C stops the running step, which saves. What
OUT holds: docs/results.md. Methods side by side, time budgets, speed tests: tools/gpu_schedule.py.
"""
import argparse
import contextlib
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
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: common/ and tools/ are imported from the repo

from common.args import git_revision, versions  # noqa: E402
from common.checkpoint import load_checkpoint  # noqa: E402
from tools import plot  # noqa: E402

METHODS = ("simclr", "moco", "byol", "simsiam", "swav", "barlow", "vicreg", "mocov3", "dino", "mae")
FINETUNED = ("mae",)  # ViT only; fine-tuned too (finetune.py), their paper's protocol
# what makes two calls the same benchmark (another --out is needed to change them)
SETTINGS = ("data", "train_per_class", "val_per_class", "methods", "arch", "epochs", "batch_size",
            "img_size", "synthetic_size", "nproc_per_node", "linear", "linear_epochs",
            "linear_batch_size", "method_flags", "extra")


def parser():
    """The table's flags (tools/gpu_schedule.py adds its own to them)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog="Flags after -- go to every method's script.")
    p.add_argument("--data", help="as the scripts' --data: cifar10, an ImageFolder root, ...")
    p.add_argument("--train-per-class", type=int, help="an ImageFolder --data: use the first N "
                   "train images of each class (linked into OUT/data, nothing copied)")
    p.add_argument("--val-per-class", type=int, help="the same for the val split")
    p.add_argument("--out", type=Path, help="the benchmark's folder (a second call resumes it)")
    p.add_argument("--runs-dir", type=Path, help="where runs/ and eval/ go (default: --out)")
    p.add_argument("--methods", default="all", help="comma-separated, in order (default: all; mae: a ViT)")
    p.add_argument("--arch", default="resnet18", help="backbone of every method (resnet18)")
    p.add_argument("--epochs", type=int, default=200, help="pre-training epochs (200)")
    p.add_argument("--batch-size", type=int, help="global batch (default: each recipe's)")
    p.add_argument("--img-size", type=int, help="default: the scripts' default for --data")
    p.add_argument("--data-dir", help="where cifar10/cifar100/stl10 live (the scripts' default)")
    p.add_argument("--workers", type=int, help="loader workers per process (the scripts' default)")
    p.add_argument("--synthetic-size", type=int, help="images of --data synthetic (smoke runs)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes, one per GPU (1)")
    p.add_argument("--train-only", action="store_true", help="train only (a later call evaluates)")
    p.add_argument("--revision", help="the revision to record where git cannot tell (no .git)")
    p.add_argument("--linear", choices=["standard", "cached"], default="standard",
                   help="linear_eval.py's protocol (standard)")
    p.add_argument("--linear-epochs", type=int, help="default: linear_eval.py's (100 at 32 px)")
    p.add_argument("--linear-batch-size", type=int, help="default: linear_eval.py's (512 at 32 px)")
    p.add_argument("--method-flags", nargs="*", default=[], metavar="METHOD=FLAGS",
                   help="flags for one method only, e.g. simclr='--warmup-epochs 1'")
    p.add_argument("--render-readme", type=Path, nargs="+", metavar="MD", help="only re-render "
                   "the <!-- results: FOLDER --> blocks of these pages from FOLDER/results.json")
    return p


def get_args(argv=None, p=None, need_out=True):
    """The arguments of the parser `p` (the table's by default), checked; the flags after -- in
    args.extra. --data and --out are needed to fill a table (`need_out`), not to render one."""
    p = p or parser()
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] != "--":
        p.error(f"unrecognized arguments: {' '.join(extra)} (flags for the methods go after --)")
    args.extra = extra[1:]
    args.methods = ([m for m in METHODS if m not in FINETUNED or args.arch.startswith("vit")]
                    if args.methods == "all" else args.methods.split(","))
    if unknown := sorted(set(args.methods) - set(METHODS)):
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if any("=" not in f for f in args.method_flags):
        p.error("--method-flags takes METHOD=FLAGS, e.g. simclr='--warmup-epochs 1'")
    args.method_flags = dict(f.split("=", 1) for f in args.method_flags)
    if need_out and not args.render_readme and (args.data is None or args.out is None):
        p.error("--data and --out are required")
    args.runs_dir = args.runs_dir or args.out
    return args


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


def steps(args, method):
    """(name, command, done?) of the method's steps: train, then knn and linear."""
    run_dir, evals = args.runs_dir / "runs" / method, args.runs_dir / "eval"
    torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc_per_node}"]
    launcher = [sys.executable, *torchrun] if args.nproc_per_node > 1 else [sys.executable]
    data = ["--data", args.data]
    for name, value in (("img_size", args.img_size), ("data_dir", args.data_dir),
                        ("workers", args.workers), ("synthetic_size", args.synthetic_size)):
        data += [f"--{name.replace('_', '-')}", str(value)] if value is not None else []
    train = [*launcher, f"{method}.py", *data, "--arch", args.arch,
             "--epochs", str(args.epochs), "--knn-every", str(args.epochs), "--run-dir",
             str(run_dir), *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
             *shlex.split(args.method_flags.get(method, "")), *args.extra]
    evaluate = [*launcher, "linear_eval.py", "--ckpt", str(run_dir / "backbone.pt"), *data]
    linear = [*evaluate, *(["--cached-features"] if args.linear == "cached" else []),
              *(["--epochs", str(args.linear_epochs)] if args.linear_epochs else []),
              *(["--batch-size", str(args.linear_batch_size)] if args.linear_batch_size else [])]
    finetune = [*launcher, "finetune.py", *evaluate[len(launcher) + 1:]]  # its recipe for the size
    todo = [("train", train, lambda: trained_epochs(run_dir) == (args.epochs, 0))]
    for name, command in [("knn", [*evaluate, "--knn"]), ("linear", linear)] + [
            ("finetune", finetune)] * (method in FINETUNED):
        result = evals / f"{method}-{name}"
        todo.append((name, [*command, "--run-dir", str(result)],
                     lambda result=result: (result / "result.json").exists()))
    return todo[:1] if args.train_only else todo


def skip_done(method, todo):
    """`todo` without its first steps that are done (a step resumed by a later call is not)."""
    while todo and todo[0][2]():
        print(f"{method}: {todo[0][0]} already done", flush=True)
        todo = todo[1:]
    return todo


def trained_epochs(run_dir):
    """(epoch, batch in that epoch) of the run directory's checkpoint; (0, 0) without one."""
    path = run_dir / "checkpoint.pt"
    ckpt = load_checkpoint(path) if path.exists() else {"epoch": 0, "batch_in_epoch": 0}
    return ckpt["epoch"], ckpt["batch_in_epoch"]


@contextlib.contextmanager
def stopping():
    """Ctrl-C (SIGINT) or SIGTERM to the benchmark, within: each running step (`stop.procs`) gets
    SIGTERM by its pid (a training saves and exits), nothing new starts (`stop.signum`); a second
    signal kills them. The steps ignore Ctrl-C (`Step`): the benchmark alone stops them."""
    stop, old = types.SimpleNamespace(signum=None, procs=set()), {}

    def handler(signum, frame):  # no print here: the main loop may be inside a print
        again, stop.signum = stop.signum is not None, stop.signum or signum
        for proc in [p for p in stop.procs if p.poll() is None]:
            proc.send_signal(signal.SIGKILL if again else signal.SIGTERM)

    if threading.current_thread() is threading.main_thread():  # signals reach it alone
        old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


class Step:
    """One step of a method (train, knn or linear) as a running process, its output appended to
    OUT/logs/<method>.<name>.log; then its outcome in the method's row."""

    def __init__(self, args, method, step, env, stop):
        (self.name, self.command, self.done), self.method, self.stop = step, method, stop
        self.log_path = args.out / "logs" / f"{method}.{self.name}.log"
        print(f"{method}: {self.name} ... (log: {self.log_path})", flush=True)
        self.log, self.started = open(self.log_path, "a"), time.time()
        print(f"$ {shlex.join(self.command)}", file=self.log, flush=True)
        # SIGINT ignored (inherited through exec): a Ctrl-C at the terminal, which reaches the
        # process group, would lose a training's steps since its checkpoint; the benchmark's
        # SIGTERM stops it. In the benchmark's group still: a kill of the group reaches it.
        main = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.proc = subprocess.Popen(self.command, cwd=REPO, stdout=self.log,
                                         stderr=subprocess.STDOUT, env=env)
        finally:
            if main:
                signal.signal(signal.SIGINT, old)
        stop.procs.add(self.proc)

    def end(self, args, entry, code, why=None, note=""):
        """Book the ended step in the row `entry`; True if it is done. `why`: what stopped it, if
        the caller did (a signal to the benchmark counts too); `note` goes on the line printed."""
        self.stop.procs.discard(self.proc)
        self.log.close()
        seconds, name = time.time() - self.started, self.name
        entry[f"{name}_seconds"] = entry.get(f"{name}_seconds", 0.0) + seconds
        entry.setdefault("commands", {})[name] = shlex.join(self.command)
        if code == 0 and self.done():
            print(f"{self.method}: {name} done in {seconds:.0f} s{note}", flush=True)
            return True
        # a step that ends unfinished while the benchmark stops was stopped by it (its SIGTERM
        # may have come from the signal handler); a training that exits 0 before its last
        # epoch was stopped by a signal of its own: both saved what they had
        why = why or ("a signal" if self.stop.signum or (code == 0 and name == "train") else None)
        if why:
            epoch, batch = trained_epochs(args.runs_dir / "runs" / self.method)
            where = (f" after {epoch} of {args.epochs} epochs"
                     + (f" and {batch} steps" if batch else "")) if name == "train" else ""
            entry["status"] = f"stopped during {name}{where} by {why} (a second call resumes it)"
            print(f"{self.method}: {name} stopped in {seconds:.0f} s{note}", flush=True)
            return False
        last = [line for line in self.log_path.read_text().splitlines() if line.strip()][-1:]
        entry["status"] = f"failed at {name} (exit {code}): {last[0][:200] if last else ''}"
        print(f"{self.method}: {name} FAILED in {seconds:.0f} s", flush=True)
        return False


def open_table(args, settings, command):
    """OUT/results.json, new or resumed, stamped with this call's machine, revision, date and
    command, and the methods to run; (None, []) where it holds a benchmark of other settings."""
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"methods": {}}
    if results.get("settings", settings) != settings:
        changed = [k for k in SETTINGS if results["settings"].get(k) != settings.get(k)]
        print(f"error: {args.out} holds a benchmark with other settings ({', '.join(changed)}): "
              f"choose another --out", file=sys.stderr)
        return None, []
    results.update(settings=settings, machine=machine(), command=command,
                   git=git_revision(short=True) or args.revision,
                   date=datetime.date.today().isoformat())
    methods = []
    for method in args.methods:
        entry = results["methods"].setdefault(method, {})
        if not (args.runs_dir / "runs" / method).exists():
            if entry.get("status") in (finished_state(args), "done"):  # only small files kept
                print(f"{method}: {entry['status']} (the row is kept: its run folder is not here)",
                      flush=True)
                continue
            entry.clear()  # a run that is not here starts again: its old times do not count
        entry.pop("status", None)  # a failure is tried again
        methods.append(method)
    return results, methods


def save(args, results):
    """OUT/results.json, as it stands."""
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


def finished_state(args):
    """The status of a finished row."""
    return "trained" if args.train_only else "done"


def finish_row(args, results, method):
    """The method's row, from the run's own files (epoch time: the median without the first
    epoch, which carries cuDNN's autotuning or compilation); its log.jsonl and args.json kept in
    OUT/records/<method> (small, kept without the checkpoints; the curves are drawn from them)."""
    entry, run_dir = results["methods"][method], args.runs_dir / "runs" / method
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    run_args = json.loads((run_dir / "args.json").read_text())
    epochs = [r for r in records if "step" not in r and r.get("epoch", 0) > 0]
    knn0 = [r["knn_top1"] for r in records if r.get("epoch") == 0 and "knn_top1" in r]
    speeds, memory, times = ([r[key] for r in epochs if key in r]
                             for key in ("img_per_s", "peak_gpu_mem_gib", "epoch_time"))
    entry.update(epochs=epochs[-1]["epoch"], batch_size=run_args["batch_size"],
                 world_size=run_args["world_size"], knn_top1_init=knn0[0] if knn0 else None,
                 img_per_s=sum(speeds) / len(speeds) if speeds else None,
                 peak_gpu_mem_gib=max(memory) if memory else None,
                 epoch_time=statistics.median(times[1:] or times) if times else None,
                 status=finished_state(args), git=results["git"], date=results["date"],
                 gpus=results["machine"]["gpus"], train_seconds=entry.get("train_seconds", 0.0))
    if not args.train_only:
        knn, linear, *tuned = [json.loads((args.runs_dir / "eval" / f"{method}-{name}/result.json")
                                          .read_text()) for name, *_ in steps(args, method)[1:]]
        entry.update(knn_top1=knn["knn_top1"], linear_top1=linear["top1"],
                     linear_top5=linear["top5"], linear_protocol=linear["protocol"],
                     linear_epochs=linear["epochs"], **{"finetune_top1": t["top1"] for t in tuned})
    (args.out / "records" / method).mkdir(parents=True, exist_ok=True)
    for name in ("log.jsonl", "args.json"):
        shutil.copyfile(run_dir / name, args.out / "records" / method / name)
    entry["records"] = f"records/{method}"


def close_table(args, results, stop):
    """Draw the curves, write results.json and results.md; the exit code: 0 if every row is
    finished, 1 if not, 128 + the signal that stopped the call."""
    finished = [m for m in args.methods if results["methods"][m].get("status") == finished_state(args)]
    drawable = [args.out / results["methods"][m]["records"] for m in finished
                if results["methods"][m].get("records")]
    if drawable and not args.train_only and args.epochs >= 3:  # fewer: points, not curves
        try:
            plot.draw(plot.collect(drawable), args.out / "curves.png", f"{args.data}, {args.arch}")
            results["curves"] = "curves.png"
        except plot.PlotError as e:
            print(f"no figure: {e}")
    save(args, results)
    (args.out / "results.md").write_text(markdown(results))
    print((args.out / "results.md").read_text())
    return 128 + stop.signum if stop.signum else int(len(finished) < len(args.methods))


def machine():
    """The CPU, memory and GPUs, which common/args.py's versions() leaves out, and those."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = (re.findall(r"model name\s*:\s*(.*)", info) or [platform.processor()])[0]
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": f"{cpu}, {os.cpu_count()} CPUs", "memory_gib": round(memory, 1),
            "gpus": gpus, **versions()}


def fmt(value, unit="", digits=1):
    """A table's cell: the value, or a dash where it was not measured."""
    return "–" if value is None else f"{value:.{digits}f}{unit}"


def markdown(results, folder="", methods=None):
    """results.md: the table (of `methods` only, if given), then what made it."""
    s, m = results["settings"], results["machine"]
    tuned = any("finetune_top1" in e for e in results["methods"].values())
    data = s["data"] + "".join(f", the first {s[f'{split}_per_class']} {split} images of each class"
                               for split in ("train", "val") if s.get(f"{split}_per_class"))
    details = [f"{s['img_size']} px" if s.get("img_size") else "",
               f"batch {s['batch_size']}" if s["batch_size"] else "",
               f"{s['nproc_per_node']} processes" if s["nproc_per_node"] > 1 else "",
               " ".join(s["extra"])]
    lines = [f"{data}; {s['arch']}, {s['epochs']} epoch{'s' * (s['epochs'] != 1)}"
             + "".join(f", {d}" for d in details if d) + f"; linear probe: {s['linear']}. "
             f"{', '.join(m['gpus']) or 'No GPU'}, {m['cpu']}; {results['date']}, "
             f"revision {results['git']}.", ""]
    head = (["Method", "Epochs", "Batch", "kNN top-1, random init", "kNN top-1", "Linear top-1",
             "Linear top-5", "Training time", "img/s"] + ["Peak GPU memory"] * bool(m["gpus"])
            + ["Fine-tuned top-1"] * tuned)
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    rows = [(method, e) for method, e in results["methods"].items()
            if not methods or method in methods]
    for method, e in rows:
        cells = [e.get("status", "not run")] + [""] * (len(head) - 2)
        if e.get("status") == "done":
            cells = [e["epochs"], e["batch_size"], *map(fmt, (e["knn_top1_init"], e["knn_top1"],
                     e["linear_top1"], e["linear_top5"])), fmt(e["train_seconds"] / 60, " min"),
                     fmt(e["img_per_s"])] + [fmt(e.get("peak_gpu_mem_gib"), " GiB", 2)] * bool(
                     m["gpus"]) + [fmt(e.get("finetune_top1"))] * tuned
        lines.append("| " + " | ".join(map(str, [method, *cells])) + " |")
    if tuned:  # what the kNN and linear cells of a fine-tuned method are (docs/mae.md)
        lines += ["", "mae: judged by fine-tuning (finetune.py), its paper's protocol; kNN and "
                  "linear read its class token, which its objective does not train for them."]
    made = (results["git"], results["date"], m["gpus"])  # rows made in other calls say so
    other = [f"{method}: revision {e['git']}, {e['date']}"
             + "".join(f", {gpu}" for gpu in e.get("gpus") or [])
             for method, e in rows if e.get("status") == "done" and "git" in e
             and (e["git"], e["date"], e.get("gpus")) != made]
    lines += ["", f"Rows made in earlier calls: {'; '.join(other)}."] if other else []
    table = []  # the timings, where measured (side by side: tools/gpu_schedule.py)
    for method, e in [(method, e) for method, e in rows if e.get("epoch_time") is not None]:
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
    if table:
        lines += ["", "| " + " | ".join(head[c] for c in keep) + " |", "|---" * len(keep) + "|"]
        lines += ["| " + " | ".join(row[c] for c in keep) + " |" for row in table]
    lines += ["", f"Command: `{results['command']}`"]
    if results.get("curves"):
        lines += ["", f"![training curves]({Path(folder) / results['curves']})"]
    return "\n".join(lines) + "\n"


def render_readme(page):
    """Each block <!-- results: FOLDER [methods=a,b] --> ... <!-- /results --> of a page becomes
    the table of FOLDER/results.json (relative to the page; those rows only); FOLDER/results.md too."""

    def table(match):
        folder, methods = match.group(1), (match.group(2).split(",") if match.group(2) else None)
        results = json.loads((page.parent / folder / "results.json").read_text())
        (page.parent / folder / "results.md").write_text(markdown(results))
        if unknown := sorted(set(methods or []) - set(results["methods"])):
            raise SystemExit(f"error: {page}: no {', '.join(unknown)} in {folder}/results.json")
        return (match.group(0).split("\n")[0] + "\n" + markdown(results, folder, methods)
                + "<!-- /results -->")

    page.write_text(re.sub(r"<!-- results: (\S+?)(?: methods=(\S+))? -->.*?<!-- /results -->",
                           table, page.read_text(), flags=re.S))


def prepare(args):
    """OUT made; the settings results.json records; --data made the --*-per-class subset."""
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k in SETTINGS}
    if args.train_per_class or args.val_per_class:
        args.data = str(subset(args.data, args.out / "data", {"train": args.train_per_class,
                                                              "val": args.val_per_class}))
    return settings


def main(argv=None):
    """Fill (or resume) the table, one step after another, or re-render pages; the exit code."""
    args = get_args(argv)
    if args.render_readme:
        for page in args.render_readme:
            render_readme(page)
            print(f"rendered the results tables of {page}")
        return 0
    settings = prepare(args)
    command = shlex.join(["python", *(sys.argv if argv is None else ["tools/benchmark.py", *argv])])
    with stopping() as stop:
        results, methods = open_table(args, settings, command)
        if results is None:
            return 2
        for method in methods:
            entry = results["methods"][method]
            for step in skip_done(method, steps(args, method)):
                if stop.signum:
                    entry["status"] = "not started: stopped by a signal"
                    break
                running = Step(args, method, step, dict(os.environ), stop)
                save(args, results)
                if not running.end(args, entry, running.proc.wait()):
                    break
            else:
                finish_row(args, results, method)
            save(args, results)
        return close_table(args, results, stop)


if __name__ == "__main__":
    sys.exit(main())
