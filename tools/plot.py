"""Training curves of cleanssl runs: loss, learning rate, kNN top-1 and images per second
against epochs, from each run directory's log.jsonl (its end-of-epoch records), several runs
overlaid, each labelled with its method and, among runs of one method, the flags that differ.

    python tools/plot.py runs/simclr/A runs/byol/B -o curves.png
    python tools/plot.py results/cpu-check/runs/* -o curves.png --json curves.json

Drawing needs matplotlib (`pip install matplotlib`), an optional dependency; the curves' data
(--json) does not.
"""
import argparse
import json
import os
import sys
from pathlib import Path

METRICS = {"loss": "loss", "lr": "learning rate", "knn_top1": "kNN top-1 (%)",
           "img_per_s": "images / s"}
# arguments that do not change what a run learns, or follow from others
NOT_IN_LABELS = {"run_dir", "argv", "git", "torch", "torchvision", "python", "cuda", "preset",
                 "peak_lr", "small_images", "log_every", "workers", "data_dir"}


class PlotError(Exception):
    """A run directory without its files, or no matplotlib to draw with."""


def read_run(run_dir):
    """(method, arguments, end-of-epoch records) of a run directory."""
    run_dir = Path(run_dir)
    try:
        args = json.loads((run_dir / "args.json").read_text())
        lines = (run_dir / "log.jsonl").read_text().splitlines()
    except OSError as e:
        raise PlotError(f"{run_dir}: not a run directory ({e.strerror}: {e.filename})") from None
    method = Path(args.get("argv", ["run"])[0]).stem
    return method, args, [r for r in map(json.loads, lines) if "step" not in r]


def labels(runs):
    """A label per (method, args): the method, and the arguments whose values differ among the
    runs of that method (runs of other methods differ by their recipe anyway)."""
    out = []
    for method, args in runs:
        same = [a for m, a in runs if m == method]
        keys = sorted(k for k in set().union(*same) - NOT_IN_LABELS
                      if len({json.dumps(a.get(k)) for a in same}) > 1)
        flags = ", ".join(f"{k}={args.get(k)}" for k in keys)
        out.append(f"{method} ({flags})" if flags else method)
    return out


def collect(run_dirs):
    """The plotted data: [{"run", "label", "series": {metric: {"epoch": [...], "value": [...]}}}]
    with each metric's values at the epochs whose end-of-epoch record holds it (kNN top-1 also
    at epoch 0, the random initialisation)."""
    runs = [read_run(d) for d in run_dirs]
    curves = []
    for run_dir, (method, args, records), label in zip(run_dirs, runs,
                                                        labels([r[:2] for r in runs])):
        series = {m: {"epoch": [r["epoch"] for r in records if m in r],
                      "value": [r[m] for r in records if m in r]} for m in METRICS}
        curves.append({"run": str(run_dir), "label": label, "series": series})
    return curves


def draw(curves, out, title=None):
    """The four panels, the runs overlaid, as an image file `out` (PNG, SVG or PDF)."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("drawing needs matplotlib, which is not installed: "
                        "pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (metric, name) in zip(axes.flat, METRICS.items()):
        for i, curve in enumerate(curves):  # a run keeps its colour in every panel
            s = curve["series"][metric]
            if s["epoch"]:
                ax.plot(s["epoch"], s["value"], marker="o" if len(s["epoch"]) < 30 else None,
                        label=curve["label"], color=f"C{i % 10}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="run directories (with args.json and log.jsonl)")
    p.add_argument("-o", "--out", default="curves.png", help="the image (default: curves.png)")
    p.add_argument("--json", help="also write the plotted data to this file")
    p.add_argument("--title", help="a title above the panels")
    args = p.parse_args(argv)
    try:
        curves = collect(args.runs)
        if args.json:
            Path(args.json).write_text(json.dumps(curves, indent=1))
        draw(curves, args.out, args.title)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(curves)} run(s) -> {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
