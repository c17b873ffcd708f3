"""One command for a results table: train every method, evaluate every backbone, write the table.

    python tools/benchmark.py --data cifar10 --methods all --arch resnet18 --epochs 200 \\
        --out results/cifar10-200ep
    python tools/benchmark.py ... --nproc-per-node 8 -- --precision bf16   # flags for every method
    python tools/benchmark.py --render-readme README.md docs/*.md          # refresh its tables

Each method's script runs as a subprocess (through torchrun with --nproc-per-node N > 1) in its own
run directory, OUT/runs/<method>; then linear_eval.py evaluates its backbone.pt: weighted kNN top-1
(k=200, T=0.07, the whole labelled train split as memory) and a linear probe (top-1/top-5; the
standard protocol, or --linear cached). OUT/results.json and OUT/results.md hold, per method:
epochs, batch, kNN top-1 of the random initialisation (the training's epoch-0 monitor) and after
training, linear top-1/top-5, training wall-clock time, img/s, peak GPU memory; with the hardware,
versions, git revision and the exact commands. OUT/curves.png draws the training curves
(tools/plot.py; needs matplotlib). Every step's output goes to OUT/logs/<method>.<step>.log.

Calling it again with the same --out skips what is done and resumes what is not (the scripts
resume from their checkpoints); a method that fails is reported in the table, and the others go on.
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
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


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                epilog="Flags after -- go to every method's script, e.g. "
                                       "-- --data-on-device --precision bf16.")
    p.add_argument("--data", help="as the scripts' --data: cifar10, an ImageFolder root, ...")
    p.add_argument("--train-per-class", type=int, help="an ImageFolder --data: use the first N "
                   "train images of each class (linked into OUT/data, nothing copied)")
    p.add_argument("--val-per-class", type=int, help="the same for the val split")
    p.add_argument("--out", type=Path, help="the benchmark's folder (a second call resumes it)")
    p.add_argument("--methods", default="all", help="comma-separated, in order (default: all)")
    p.add_argument("--arch", default="resnet18", help="backbone of every method (resnet18)")
    p.add_argument("--epochs", type=int, default=200, help="pre-training epochs (200)")
    p.add_argument("--batch-size", type=int, help="global batch (default: each recipe's)")
    p.add_argument("--img-size", type=int, help="default: the scripts' default for --data")
    p.add_argument("--data-dir", help="where cifar10/cifar100/stl10 live (the scripts' default)")
    p.add_argument("--workers", type=int, help="loader workers per process (the scripts' default)")
    p.add_argument("--synthetic-size", type=int, help="images of --data synthetic (smoke runs)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="processes, one per GPU (1)")
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


def shared_flags(args):
    flags = ["--data", args.data]
    for name in ("img_size", "data_dir", "workers", "synthetic_size"):
        if getattr(args, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def steps(args, method):
    """(name, command, done?) of the method's three steps."""
    run_dir, evals = args.out / "runs" / method, args.out / "eval"
    train = [*launcher(args), f"{method}.py", *shared_flags(args), "--arch", args.arch,
             "--epochs", str(args.epochs), "--knn-every", str(args.epochs), "--run-dir",
             str(run_dir), *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
             *shlex.split(args.method_flags.get(method, "")), *args.extra]
    evaluate = [*launcher(args), "linear_eval.py", "--ckpt", str(run_dir / "backbone.pt"),
                *shared_flags(args)]
    linear = [*evaluate, *(["--cached-features"] if args.linear == "cached" else []),
              *(["--epochs", str(args.linear_epochs)] if args.linear_epochs else []),
              *(["--batch-size", str(args.linear_batch_size)] if args.linear_batch_size else [])]
    return [("train", train, lambda: trained(run_dir, args.epochs)),
            ("knn", [*evaluate, "--knn", "--run-dir", str(evals / f"{method}-knn")],
             lambda: (evals / f"{method}-knn/result.json").exists()),
            ("linear", [*linear, "--run-dir", str(evals / f"{method}-linear")],
             lambda: (evals / f"{method}-linear/result.json").exists())]


def trained(run_dir, epochs):
    """Whether the run directory holds the checkpoint of its last epoch."""
    if not (run_dir / "checkpoint.pt").exists():
        return False
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    return (ckpt["epoch"], ckpt["batch_in_epoch"]) == (epochs, 0)


def run_step(args, method, name, command, entry):
    """Run one step, its output in OUT/logs; add its wall-clock seconds to `entry`."""
    log = args.out / "logs" / f"{method}.{name}.log"
    print(f"{method}: {name} ... (log: {log})", flush=True)
    start = time.time()
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        code = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.time() - start
    entry[f"{name}_seconds"] = entry.get(f"{name}_seconds", 0.0) + seconds
    entry.setdefault("commands", {})[name] = shlex.join(command)
    if code:
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:]
        entry["status"] = f"failed at {name} (exit {code}): {last[0][:200] if last else ''}"
    print(f"{method}: {name} {'done' if not code else 'FAILED'} in {seconds:.0f} s", flush=True)
    return code == 0


def summarise(entry, run_dir, evals, method):
    """The table's numbers, from the runs' own files."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    args = json.loads((run_dir / "args.json").read_text())
    epochs = [r for r in records if "step" not in r and r.get("epoch", 0) > 0]
    knn0 = [r["knn_top1"] for r in records if r.get("epoch") == 0 and "knn_top1" in r]
    speeds = [r["img_per_s"] for r in epochs if "img_per_s" in r]
    memory = [r["peak_gpu_mem_gib"] for r in epochs if "peak_gpu_mem_gib" in r]
    knn = json.loads((evals / f"{method}-knn" / "result.json").read_text())
    linear = json.loads((evals / f"{method}-linear" / "result.json").read_text())
    entry.update(epochs=epochs[-1]["epoch"], batch_size=args["batch_size"],
                 world_size=args["world_size"], knn_top1_init=knn0[0] if knn0 else None,
                 knn_top1=knn["knn_top1"], linear_top1=linear["top1"], linear_top5=linear["top5"],
                 linear_protocol=linear["protocol"], linear_epochs=linear["epochs"],
                 img_per_s=sum(speeds) / len(speeds) if speeds else None,
                 peak_gpu_mem_gib=max(memory) if memory else None, status="done")


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
             "Linear top-5 | Training time | img/s | Peak GPU memory |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, e in results["methods"].items():
        if methods and method not in methods:
            continue
        if e.get("status") != "done":
            lines.append(f"| {method} | {e.get('status', 'not run')} |||||||||")
            continue
        lines.append(f"| {method} | {e['epochs']} | {e['batch_size']} | "
                     f"{fmt(e['knn_top1_init'])} | {fmt(e['knn_top1'])} | "
                     f"{fmt(e['linear_top1'])} | {fmt(e['linear_top5'])} | "
                     f"{fmt(e['train_seconds'] / 60, ' min')} | {fmt(e['img_per_s'])} | "
                     f"{fmt(e['peak_gpu_mem_gib'], ' GiB', 2)} |")
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

def main(argv=None):
    args = get_args(argv)
    if args.render_readme:
        for page in args.render_readme:
            render_readme(page)
            print(f"rendered the results tables of {page}")
        return 0
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k in SETTINGS}
    if args.train_per_class or args.val_per_class:
        args.data = str(subset(args.data, args.out / "data", {"train": args.train_per_class,
                                                              "val": args.val_per_class}))
    results = json.loads(path.read_text()) if path.exists() else {"methods": {}}
    if results.get("settings", settings) != settings:
        changed = [k for k in SETTINGS if results["settings"].get(k) != settings.get(k)]
        print(f"error: {args.out} holds a benchmark with other settings ({', '.join(changed)}): "
              f"choose another --out", file=sys.stderr)
        return 2
    results.update(settings=settings, machine=machine(), git=git_revision(),
                   date=datetime.date.today().isoformat(),
                   command=shlex.join(["python", *sys.argv] if argv is None
                                      else ["python", "tools/benchmark.py", *argv]))
    for method in args.methods:
        entry = results["methods"].setdefault(method, {})
        entry.pop("status", None)  # a failure is retried
        for name, command, done in steps(args, method):
            if done():
                print(f"{method}: {name} already done", flush=True)
            elif not run_step(args, method, name, command, entry):
                break
            path.write_text(json.dumps(results, indent=2))  # nothing done is lost on a crash
        else:
            entry.setdefault("train_seconds", 0.0)
            summarise(entry, args.out / "runs" / method, args.out / "eval", method)
        path.write_text(json.dumps(results, indent=2))
    finished = [args.out / "runs" / m for m in args.methods
                if results["methods"][m].get("status") == "done"]
    if finished:
        try:
            plot.draw(plot.collect(finished), args.out / "curves.png",
                      f"{args.data}, {args.arch}")
            results["curves"] = "curves.png"
        except plot.PlotError as e:
            print(f"no figure: {e}")
    path.write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    print((args.out / "results.md").read_text())
    return 1 if len(finished) < len(args.methods) else 0


if __name__ == "__main__":
    sys.exit(main())
