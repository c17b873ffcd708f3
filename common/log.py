"""Rank-0 output: printed lines, `log.jsonl`, progress bars, and clean exits on bad input."""
import functools
import json
import os
import sys
import time

from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm


class UserError(Exception):
    """Bad input from the user (a path, a flag, a file): reported in one line, exit code 2."""


def exit_on_user_error(main):
    """Decorator for a script's main(): a UserError prints `error: ...` and exits with 2. Under
    torchrun, other exceptions are also recorded (`record`) in the error file torchrun gives each
    worker, so that its failure summary shows the failing rank's traceback, not only its exit
    code."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
    return record(wrapper) if "TORCHELASTIC_ERROR_FILE" in os.environ else wrapper


class Logger:
    """Prints and appends JSON lines to `run_dir/log.jsonl` on rank 0; silent elsewhere."""

    def __init__(self, run_dir, is_main):
        self.is_main = is_main
        self.path = os.path.join(run_dir, "log.jsonl") if run_dir else None

    def print(self, *msg):
        if self.is_main:
            print(*msg, flush=True)

    def summary(self, record):
        """Print `record` as one line and append it to log.jsonl (end of an epoch)."""
        self.print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in record.items()))
        self.log(record)

    def log(self, record):
        if not self.is_main:
            return
        # 7 significant digits: short lines, and small learning rates keep their precision
        record = {k: (float(f"{v:.7g}") if isinstance(v, float) else v) for k, v in record.items()}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Progress:
    """Iterate a loader with a tqdm bar on a terminal (rank 0), or a plain line per `update`
    when stderr is a file (Slurm logs). `update(record)` shows a log record's metrics."""

    def __init__(self, iterable, total, desc, is_main):
        self.iterable, self.total, self.desc = iterable, total, desc
        self.bar = None
        self.plain = is_main and not sys.stderr.isatty()
        if is_main and not self.plain:
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=True)
        self.start, self.step = time.time(), 0

    def __iter__(self):
        for item in self.iterable:
            self.step += 1  # counted when handed out: an `update` during a step includes it
            yield item
            if self.bar is not None:
                self.bar.update(1)
        if self.bar is not None:
            self.bar.close()

    def update(self, metrics):
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in metrics.items() if k not in ("epoch", "step"))
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        elif self.plain:
            elapsed = time.time() - self.start
            eta = elapsed / max(self.step, 1) * (self.total - self.step)
            print(f"{self.desc} {self.step}/{self.total} {text} eta {eta / 60:.1f}min", flush=True)
