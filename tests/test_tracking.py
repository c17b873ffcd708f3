"""TensorBoard and W&B (common/log.py): the same records as log.jsonl, each step once after a
crash and a resume, nothing new without the packages.

The tests drive Logger as a training script does: a train record every EVERY steps, an epoch
summary at each epoch's end (and epoch 0, the random-init kNN, in a new run), a crash after some
record (nothing closed: the worst case, everything it logged reached the disk), then a new
Logger resumed at an earlier checkpoint's position, which logs the rest.
"""
import argparse
import glob
import importlib.machinery
import json
import os
import struct
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from common.errors import UserError
from common.log import Logger
from common.args import add_tracking_args

SPE, EVERY, EPOCHS = 8, 2, 4  # steps per epoch, --log-every, --epochs: 16 train records


def tracking_args(run_dir, *argv):
    args = add_tracking_args(argparse.ArgumentParser()).parse_args(list(argv))
    args.run_dir, args.lr, args.epochs = str(run_dir), 0.3, EPOCHS
    return args


def train(log, start=None, crash=None, attempt=0):
    """A script's loop from checkpoint position `start` ((epoch, batch), None: a new run) to the
    end, or until it logged the record placed at `crash` ((kind, step)): then it returns without
    closing anything. Values depend on the step only (an exact resume logs them again), but for
    img_per_s, which depends on the `attempt` as a wall-clock figure does."""
    epoch0, batch0 = start or (0, 0)
    if start is None:
        log.summary({"epoch": 0, "knn_top1": 10.0})
    for epoch in range(epoch0, EPOCHS):
        for i in range(batch0 if epoch == epoch0 else 0, SPE):
            step = epoch * SPE + i + 1
            if (i + 1) % EVERY == 0:
                log.log({"epoch": epoch, "step": step, "loss": 5 / step,
                         "lr": 0.3 * (1 - step / 32), "img_per_s": 100.0 + attempt + step / 7})
                if crash == ("train", step):
                    return log
        log.summary({"epoch": epoch + 1, "loss": 4 / (epoch + 1), "epoch_time": 2.5,
                     "img_per_s": 90.0 + attempt, "knn_top1": 10.0 + 7 * epoch})
        if crash == ("epoch", (epoch + 1) * SPE):
            return log
    log.close()
    return log


def run(run_dir, attempts, *argv):
    """A new run, then for each (crash, resume position) a crash and a resumed process."""
    start, logs = None, []
    for n, (crash, resume_at) in enumerate(attempts + [(None, None)]):
        log = Logger(str(run_dir))
        log.start_tracking(tracking_args(run_dir, *argv), SPE, resume=start)
        logs.append(train(log, start, crash, attempt=n))
        if log.sinks:
            log.sinks.flush()
        if crash and log.sinks and log.sinks.wandb:  # what the crashed process sent reached W&B
            log.sinks.wandb.finish()  # (worst case)
        start = resume_at
    return logs


def places(records):
    return [("train", r["step"]) if "step" in r else ("epoch", r["epoch"] * SPE) for r in records]


def jsonl(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def as_tracked(records, dtype=float):
    """log.jsonl's records as the sinks hold them: {(kind, step): {key: value}}."""
    return {place: {k: dtype(v) for k, v in r.items() if k != "step"}
            for place, r in zip(places(records), records)}


# A crash right after epoch 2's summary, before its checkpoint: resumed at a stop checkpoint at
# step 11, (1, 3), so the train records 12-16 and the summary of epoch 2 are dropped and logged
# again.
ONE_CRASH = [(("epoch", 16), (1, 3))]
# A crash at step 22, resumed at epoch 2's checkpoint (16, its summary kept); then a crash after
# epoch 3's summary, resumed at a stop checkpoint at step 21: three processes, three files.
TWO_CRASHES = [(("train", 22), (2, 0)), (("epoch", 24), (2, 5))]


@pytest.fixture(scope="module")
def straight_log(module_tmp):
    """log.jsonl of the same run, uninterrupted and without the packages' sinks."""
    run_dir = module_tmp("straight")
    run(run_dir, [], "--no-tensorboard")
    return jsonl(run_dir)


# ------------------------------------------------------------------------------- TensorBoard

def tensorboard_records(run_dir):
    """Scalars as TensorBoard's own reader gives them (purge_step applied): {(kind, step):
    {key: value}}, and the (tag, step) pairs found more than once."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    records, seen, twice = {}, set(), []
    for tag in acc.Tags()["scalars"]:
        kind, key = tag.split("/", 1)
        for event in acc.Scalars(tag):
            twice += [(tag, event.step)] if (tag, event.step) in seen else []
            seen.add((tag, event.step))
            records.setdefault((kind, event.step), {})[key] = np.float32(event.value)
    return records, twice, acc


def test_tensorboard_equals_log_jsonl(tmp_path, straight_log):
    pytest.importorskip("tensorboard", reason="tensorboard not installed "
                        "(pip install -r requirements-extras.txt)")
    run(tmp_path, [])
    assert jsonl(tmp_path) == straight_log
    records, twice, acc = tensorboard_records(tmp_path)
    assert not twice
    assert records == as_tracked(straight_log, np.float32)
    assert {"train/loss", "train/lr", "train/img_per_s", "epoch/knn_top1",
            "epoch/epoch_time"} <= set(acc.Tags()["scalars"])
    args_text = acc.Tensors("args/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| lr | 0.3 |" in args_text and "| tensorboard | null |" in args_text
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 1


@pytest.mark.parametrize("attempts, again", [(ONE_CRASH, 12), (TWO_CRASHES, 22)],
                         ids=["one-crash", "two-crashes"])
def test_tensorboard_resumed_holds_each_step_once(tmp_path, straight_log, attempts, again):
    pytest.importorskip("tensorboard", reason="tensorboard not installed "
                        "(pip install -r requirements-extras.txt)")
    run(tmp_path, attempts)
    log = jsonl(tmp_path)
    assert places(log) == places(straight_log)  # log.jsonl: no record twice, none missing
    records, twice, _ = tensorboard_records(tmp_path)
    assert not twice
    assert records == as_tracked(log, np.float32)  # the resumed values, as in log.jsonl
    assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == len(attempts) + 1
    # a step logged again after the last resume holds the last attempt's value
    for step in again, 32:
        value = 100.0 + len(attempts) + step / 7
        assert records[("train", step)]["img_per_s"] == np.float32(f"{value:.7g}")


def test_tensorboard_turned_on_mid_run_gets_the_kept_records(tmp_path, straight_log):
    pytest.importorskip("tensorboard", reason="tensorboard not installed "
                        "(pip install -r requirements-extras.txt)")
    log = Logger(str(tmp_path))
    log.start_tracking(tracking_args(tmp_path, "--no-tensorboard"), SPE)
    train(log, None, crash=("train", 22))
    run_on = Logger(str(tmp_path))
    run_on.start_tracking(tracking_args(tmp_path), SPE, resume=(2, 0))
    train(run_on, (2, 0))
    records, twice, _ = tensorboard_records(tmp_path)
    assert not twice and records == as_tracked(jsonl(tmp_path), np.float32)


# ------------------------------------------------------------------------------- W&B

def wandb_records(path):
    """The records of an offline run's .wandb file, read with wandb's own protobuf classes.
    The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then
    32 KiB blocks of chunks, each with a 7-byte header (CRC, length, type: 1 full, 2 first,
    3 middle, 4 last); a block's tail shorter than a chunk header is padding."""
    from wandb.proto.wandb_internal_pb2 import Record
    with open(path, "rb") as f:
        data = f.read()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), path
    pos, chunks = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            return
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def wandb_history(run_dir):
    """Every offline part of the run: {(kind, step): {key: value}}, the (key, step) pairs sent
    more than once, and the run id of each part."""
    history, seen, twice, ids = {}, set(), [], []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "*.wandb"))):
        # wandb's service process may still be writing a finished run's file: wait for its end
        deadline = time.time() + 20
        while not any(r.HasField("exit") for r in wandb_records(path)) and time.time() < deadline:
            time.sleep(0.1)
        for record in wandb_records(path):
            if record.HasField("run"):
                ids.append(record.run.run_id)
            if not record.HasField("history"):
                continue
            step = record.history.step.num
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if key.startswith("_"):
                    continue
                twice += [(key, step)] if (key, step) in seen else []
                seen.add((key, step))
                kind, name = key.split("/", 1)
                history.setdefault((kind, step), {})[name] = json.loads(item.value_json)
    return history, twice, ids


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb not installed "
                        "(pip install -r requirements-extras.txt)")
    for name, value in [("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"),
                        ("WANDB_CONSOLE", "off"), ("WANDB_DISABLE_GIT", "true"),
                        ("WANDB_DISABLE_CODE", "true"), ("WANDB_DIR", tmp_path / "wandb_dir"),
                        ("WANDB_CONFIG_DIR", tmp_path / "config"),
                        ("WANDB_CACHE_DIR", tmp_path / "cache"),
                        ("WANDB_DATA_DIR", tmp_path / "data")]:
        monkeypatch.setenv(name, str(value))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return run_dir


@pytest.mark.parametrize("attempts", [[], TWO_CRASHES], ids=["straight", "two-crashes"])
def test_wandb_offline_same_records_one_run_id(wandb_offline, straight_log, attempts):
    run(wandb_offline, attempts, "--wandb", "cleanssl-test", "--no-tensorboard")
    log = jsonl(wandb_offline)
    assert places(log) == places(straight_log)
    history, twice, ids = wandb_history(wandb_offline)
    assert not twice  # no step sent twice, across the processes
    with open(wandb_offline / "wandb_run_id") as f:
        assert ids == [f.read().strip()] * (len(attempts) + 1)  # one W&B run, one part a process
    expected = as_tracked(log)
    for values in list(expected.values()) + list(history.values()):
        values.pop("img_per_s", None)  # W&B keeps the first attempt's, log.jsonl the last one's
    assert history == expected


def fake_wandb(monkeypatch, resumed, starting_step):
    """A stand-in `wandb` module recording what is logged, as an online run that the server
    resumed (or not) would be."""
    sent = []

    class Run:
        def __init__(self, **kwargs):
            self.init = kwargs
            self.resumed, self.starting_step = resumed, starting_step

        def log(self, values, step, commit):
            sent.append((step, sorted(values)))

        def finish(self):
            pass

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **kwargs: Run(**kwargs)
    module.errors = types.SimpleNamespace(Error=RuntimeError)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return sent


def test_wandb_resumed_online_sends_what_the_server_lacks(tmp_path, monkeypatch):
    sent = fake_wandb(monkeypatch, resumed=False, starting_step=0)
    log = Logger(str(tmp_path))
    log.start_tracking(tracking_args(tmp_path, "--wandb", "p", "--no-tensorboard"), SPE)
    train(log, None, crash=("train", 22))
    assert [s for s, _ in sent] == [0, 2, 4, 6, 8, 8, 10, 12, 14, 16, 16, 18, 20, 22]
    # the server got the steps up to 18 (it lost the rest in the crash); resumed at step 16
    sent_after = fake_wandb(monkeypatch, resumed=True, starting_step=19)
    log = Logger(str(tmp_path))
    log.start_tracking(tracking_args(tmp_path, "--wandb", "p", "--no-tensorboard"), SPE,
                       resume=(2, 0))
    with open(tmp_path / "wandb_run_id") as f:
        init = log.sinks.wandb.init
        assert init["id"] == f.read().strip() and init["resume"] == "allow"
    train(log, (2, 0))
    assert [s for s, _ in sent_after] == [20, 22, 24, 24, 26, 28, 30, 32, 32]


def test_wandb_first_asked_mid_run_gets_the_kept_records(tmp_path, monkeypatch):
    log = Logger(str(tmp_path))
    log.start_tracking(tracking_args(tmp_path, "--no-tensorboard"), SPE)
    train(log, None, crash=("train", 22))
    sent = fake_wandb(monkeypatch, resumed=False, starting_step=0)
    log = Logger(str(tmp_path))
    log.start_tracking(tracking_args(tmp_path, "--wandb", "p", "--no-tensorboard"), SPE,
                       resume=(2, 0))
    train(log, (2, 0))
    steps = [s for s, _ in sent]
    assert steps == sorted(steps) and len(sent) == len(jsonl(tmp_path))
    assert sent[1] == (2, ["train/epoch", "train/img_per_s", "train/loss", "train/lr"])


# ------------------------------------------------------------------------------- without them

def test_without_the_packages_only_log_jsonl(tmp_path, monkeypatch, straight_log, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    monkeypatch.setitem(sys.modules, "wandb", None)
    log = Logger(str(tmp_path))
    log.start_tracking(tracking_args(tmp_path), SPE)
    train(log, None, crash=("train", 22))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"epoch": 2, "step": 3')  # a line the crash cut short
    log = Logger(str(tmp_path))
    log.start_tracking(tracking_args(tmp_path), SPE, resume=(2, 0))
    train(log, (2, 0))
    assert sorted(os.listdir(tmp_path)) == ["log.jsonl"]
    assert jsonl(tmp_path) == straight_log
    assert "TensorBoard" not in capsys.readouterr().out
    with pytest.raises(UserError, match=r"^--wandb needs the wandb package: pip install wandb"):
        tracking_args(tmp_path, "--wandb", "project")
    with pytest.raises(UserError, match="pip install tensorboard"):
        Logger(str(tmp_path)).start_tracking(
            tracking_args(tmp_path, "--tensorboard"), SPE)


def test_other_ranks_and_lone_wandb_flags(tmp_path, monkeypatch):
    monkeypatch.setattr("common.log.get_rank", lambda: 1)  # as a process of rank 1
    log = Logger(str(tmp_path))
    monkeypatch.undo()
    log.start_tracking(tracking_args(tmp_path), SPE)
    train(log)
    assert os.listdir(tmp_path) == []
    with pytest.raises(UserError, match=r"--wandb-entity --wandb-tags: give the W&B project"):
        Logger(str(tmp_path)).start_tracking(
            tracking_args(tmp_path, "--wandb-entity", "me", "--wandb-tags", "a"), SPE)


def test_imports_only_what_is_asked(tmp_path):
    """A fresh interpreter: no tracking package imported unless its sink is on."""
    code = ("import sys; from tests.test_tracking import *\n"
            "for n, argv in enumerate([['--no-tensorboard'], []]):\n"
            "    run_dir = f'{sys.argv[1]}/{n}'; os.mkdir(run_dir); log = Logger(run_dir)\n"
            "    log.start_tracking(tracking_args(run_dir, *argv), SPE); train(log)\n"
            "    print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorboard', 'wandb'}))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=root, text=True,
                         capture_output=True, check=True).stdout
    with_tensorboard = "['tensorboard']" if importlib.util.find_spec("tensorboard") else "[]"
    assert [line for line in out.splitlines() if line.startswith("[")] == ["[]", with_tensorboard]


# ------------------------------------------------------------------------------- cost

@pytest.mark.slow
def test_cost_per_record(tmp_path, monkeypatch):
    """Logger.log per train record: log.jsonl alone, + TensorBoard, + W&B offline, interleaved in
    rounds in one process (medians), and the events' size per 1,000 records. Prints the figures:
    python -m pytest tests/test_tracking.py -m slow -s"""
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    sinks = {"log.jsonl": ["--no-tensorboard"], "+ TensorBoard": []}
    if importlib.util.find_spec("wandb"):
        sinks["+ W&B offline"] = ["--no-tensorboard", "--wandb", "cost"]
    logs, times, step = {}, {name: [] for name in sinks}, 0
    for n, (name, argv) in enumerate(sinks.items()):
        (tmp_path / str(n)).mkdir()
        logs[name] = Logger(str(tmp_path / str(n)))
        logs[name].start_tracking(tracking_args(tmp_path / str(n), *argv), 10**6)
    for _ in range(7):
        for name, log in logs.items():
            start = time.perf_counter()
            for step in range(step + 1, step + 501):
                log.log({"epoch": 0, "step": step, "loss": 6 / step, "lr": 0.3 * (1 - step / 1e5),
                         "img_per_s": 1234.5 + step % 7})
            times[name].append((time.perf_counter() - start) / 500)
    for log in logs.values():
        log.close()
    base = np.median(times["log.jsonl"])
    for name, values in times.items():
        print(f"{name}: {np.median(values) * 1e6:.1f} us per record "
              f"({np.median(values) / base:.2f}x log.jsonl alone)")
    events = glob.glob(str(tmp_path / "1" / "events.out.tfevents.*"))
    print(f"events: {os.path.getsize(events[0]) / 3.5 / 1024:.1f} KiB per 1,000 records")
    assert np.median(times["+ TensorBoard"]) < 1e-3


# ------------------------------------------------------------------------------- the scripts

def script_places(records, steps_per_epoch):
    return [("train", r["step"]) if "step" in r else ("epoch", r["epoch"] * steps_per_epoch)
            for r in records]


def script_tracked(records, steps_per_epoch, dtype=float):
    return {place: {k: dtype(v) for k, v in r.items() if k != "step"}
            for place, r in zip(script_places(records, steps_per_epoch), records)}


@pytest.mark.full
def test_a_script_stopped_and_resumed_mid_epoch(tmp_path):
    """simclr.py itself, uninterrupted and stopped mid-epoch then resumed (SIGUSR1, as Slurm
    before a time limit): TensorBoard's events and the W&B offline files equal log.jsonl record
    by record, each step once, one W&B run id across both processes."""
    pytest.importorskip("tensorboard", reason="tensorboard not installed "
                        "(pip install -r requirements-extras.txt)")
    pytest.importorskip("wandb", reason="wandb not installed "
                        "(pip install -r requirements-extras.txt)")
    from tests.helpers import TINY, ok, run as run_script, run_until_stopped
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
           "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true",
           "WANDB_CONFIG_DIR": str(tmp_path / "config"), "WANDB_CACHE_DIR": str(tmp_path / "c"),
           "WANDB_DATA_DIR": str(tmp_path / "data")}
    os.environ.update(env)  # run_until_stopped passes this process's environment on
    try:
        steps_per_epoch = 10  # 160 images, batch 16
        flags = ["simclr.py", "--data", "synthetic", *TINY, "--synthetic-size", "160",
                 "--batch-size", "16", "--epochs", "2", "--knn-every", "1",
                 "--wandb", "cleanssl-test"]
        straight, split = tmp_path / "straight", tmp_path / "split"
        ok(run_script([*flags, "--run-dir", straight], env=env))
        stopped = run_until_stopped([*flags, "--run-dir", split], split, after_step=13)
        assert stopped["epoch"] == 1 and 0 < stopped["batch_in_epoch"] < steps_per_epoch
        ok(run_script([*flags, "--run-dir", split], env=env))
    finally:
        for name in env:
            os.environ.pop(name, None)
    one, two = jsonl(straight), jsonl(split)
    assert script_places(two, steps_per_epoch) == script_places(one, steps_per_epoch)
    for run_dir, log, parts in ((straight, one, 1), (split, two, 2)):
        records, twice, _ = tensorboard_records(run_dir)
        assert not twice and records == script_tracked(log, steps_per_epoch, np.float32)
        history, twice, ids = wandb_history(run_dir)
        assert not twice and len(ids) == parts and len(set(ids)) == 1
        expected = script_tracked(log, steps_per_epoch)
        for values in list(expected.values()) + list(history.values()):
            for key in ("img_per_s", "epoch_time"):  # wall-clock figures: W&B keeps the first
                values.pop(key, None)
        assert history == expected
    # the resumed run learned exactly what the uninterrupted one did: the same step records and
    # kNN (an epoch summary's mean loss covers the steps its own process trained)
    strip = lambda log: [{k: v for k, v in r.items() if k in ("step", "loss", "lr", "knn_top1")
                          and ("step" in r or k != "loss")} for r in log]
    assert strip(one) == strip(two)
