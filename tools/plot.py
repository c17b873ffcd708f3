"""Training curves of cleanssl runs: loss, learning rate, kNN top-1 and images per second (and the
online probe's top-1, the epoch time and the collapse monitor, when logged) against epochs, from
each run directory's log.jsonl (its end-of-epoch records), several runs overlaid. The legend
names each run by its method, numbered when a method has several runs; what differs between
those runs (the flags) is written below the panels, so long flag lists never squeeze the plots.

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
           "img_per_s": "images / s", "probe_top1": "online probe top-1 (%)",
           "epoch_time": "epoch time (s)",
           "embedding_std": "collapse monitor: std of the unit embedding",
           "teacher_entropy": "collapse monitor: DINO's teacher entropy",
           "kl": "DINO: KL(teacher || student)"}
ALWAYS_DRAWN = ("loss", "lr", "knn_top1", "img_per_s")  # the others when a run logged them
# arguments that do not change what a run learns, or follow from others
NOT_IN_LABELS = {"run_dir", "argv", "git", "torch", "torchvision", "python", "cuda", "preset",
                 "peak_lr", "small_images", "log_every", "workers", "data_dir", "peak_lr_given",
                 "allow_changes", "tensorboard", "wandb", "wandb_entity", "wandb_name",
                 "wandb_group", "wandb_tags", "wandb_mode"}


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
    """(label, flags) per (method, args): the label is the method, with #1, #2, ... when the
    method has several runs; flags, the arguments whose values differ among the runs of that
    method (runs of other methods differ by their recipe anyway), empty for a lone run."""
    out, seen = [], {}
    for method, args in runs:
        same = [a for m, a in runs if m == method]
        keys = sorted(k for k in set().union(*same) - NOT_IN_LABELS
                      if len({json.dumps(a.get(k)) for a in same}) > 1)
        seen[method] = seen.get(method, 0) + 1
        label = f"{method} #{seen[method]}" if len(same) > 1 else method
        value = lambda v: f"{v:.6g}" if isinstance(v, float) else v  # 0.3, not 0.30000000000000004
        out.append((label, ", ".join(f"{k}={value(args.get(k))}" for k in keys)))
    return out


def collect(run_dirs):
    """The plotted data: [{"run", "label", "flags", "series": {metric: {"epoch": [...],
    "value": [...]}}}] with each metric's values at the epochs whose end-of-epoch record holds it
    (kNN top-1 also at epoch 0, the random initialisation)."""
    runs = [read_run(d) for d in run_dirs]
    curves = []
    for run_dir, (method, args, records), (label, flags) in zip(
            run_dirs, runs, labels([r[:2] for r in runs])):
        series = {m: {"epoch": [r["epoch"] for r in records if m in r],
                      "value": [r[m] for r in records if m in r]} for m in METRICS}
        curves.append({"run": str(run_dir), "label": label, "flags": flags, "series": series})
    return curves


def draw(curves, out, title=None):
    """The panels (two per row), the runs overlaid, as an image file `out` (PNG, SVG or PDF);
    below them, the flags that tell numbered runs apart."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("drawing needs matplotlib, which is not installed: "
                        "pip install matplotlib") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    metrics = [m for m in METRICS if m in ALWAYS_DRAWN
               or any(c["series"][m]["epoch"] for c in curves)]
    notes = [f"{c['label']}: {c['flags']}" for c in curves if c["flags"]]
    rows = (len(metrics) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.6 * rows + 0.25 * len(notes)))
    for ax, metric in zip(axes.flat, metrics):
        for i, curve in enumerate(curves):  # a run keeps its colour in every panel
            s = curve["series"][metric]
            if s["epoch"]:
                ax.plot(s["epoch"], s["value"], marker="o" if len(s["epoch"]) < 30 else None,
                        label=curve["label"], color=f"C{i % 10}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(METRICS[metric])
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.25 * len(notes) / fig.get_figheight(), 1, 1))
    if notes:  # one line per numbered run; the figure grew to hold them
        fig.text(0.01, 0.01, "\n".join(notes), fontsize="small", va="bottom", wrap=True)
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
