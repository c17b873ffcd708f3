"""tools/gpu_schedule.py: methods side by side (--parallel) give what tools/benchmark.py's
sequential run gives, also when stopped by Ctrl-C and resumed; a training's epochs are timed from
its log.jsonl, also when a resumed run rewrites it shorter; --time-budget starts only what fits
(one slot simulation, which the speed table's estimates use too) and stops what still runs at its
end; --choose picks the speed test that fits the most rows; a GPU session of tools/gpu_window.sh,
run on the CPU with tiny settings, leaves only small files and the next session resumes from
them."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from common.checkpoint import FORMAT
from tools import benchmark, gpu_schedule
from tests.helpers import REPO, SUBPROCESS_ENV, assert_same_tensors, read_log
from tests.test_benchmark import TINY, commands

# 6 steps of 16 images per epoch: a stop signal lands inside the epoch
TWO = ["--data", "synthetic", "--synthetic-size", "96", "--arch", "resnet18", "--img-size", "16",
       "--epochs", "1", "--batch-size", "16", "--workers", "0", "--linear", "cached",
       "--linear-epochs", "2", "--linear-batch-size", "16", "--methods", "simclr,simsiam"]
AFTER = ["--", "--log-every", "1"]


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread in every step, sequential or side by side: the same arithmetic."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def sequential(module_tmp, one_thread):
    """The table as tools/benchmark.py fills it, one step after another."""
    out = module_tmp("sequential") / "out"
    assert benchmark.main([*TWO, "--out", str(out), *AFTER]) == 0
    return out


def losses(run_dir):
    """{(epoch, step): loss} of a run's log.jsonl, the epochs' means included (step None): a
    run resumed inside an epoch logs the mean over the whole epoch too."""
    return {(r["epoch"], r.get("step")): r["loss"] for r in read_log(run_dir) if "loss" in r}


def assert_same_results(a, b):
    """Two benchmark folders hold the same table: kNN and linear top-1/top-5, every logged loss,
    bit-identical backbones."""
    rows_a = json.loads((a / "results.json").read_text())["methods"]
    rows_b = json.loads((b / "results.json").read_text())["methods"]
    for method in ("simclr", "simsiam"):
        ra, rb = rows_a[method], rows_b[method]
        assert ra["status"] == rb["status"] == "done"
        for key in ("epochs", "knn_top1_init", "knn_top1", "linear_top1", "linear_top5"):
            assert ra[key] == rb[key], (method, key)
        run_a, run_b = a / "runs" / method, b / "runs" / method
        la, lb = losses(run_a), losses(run_b)
        assert la == lb and len([k for k in la if k[1]]) == 6, method
        assert_same_tensors(torch.load(run_a / "backbone.pt"), torch.load(run_b / "backbone.pt"))


@pytest.mark.full  # whole benchmark runs: the full suite
def test_methods_side_by_side_give_the_sequential_results(sequential, tmp_path):
    out = tmp_path / "out"
    assert gpu_schedule.main([*TWO, "--parallel", "2", "--out", str(out), *AFTER]) == 0
    assert_same_results(sequential, out)
    rows = {folder: json.loads((folder / "results.json").read_text())["methods"]
            for folder in (sequential, out)}
    # one step after another, tools/benchmark.py times no side by side; here they did overlap
    assert all("side_by_side" not in r and r["epoch_time"] > 0 for r in rows[sequential].values())
    assert {r["side_by_side"] for r in rows[out].values()} == {2}
    for row in rows[out].values():  # the epoch time of each, as its log says
        assert 1 < row["side_by_side_mean"] <= 2
        assert row["epoch_time"] > 0 and row["epochs_timed"] == 1
    assert "| simsiam | 2" in (out / "results.md").read_text()


def live_processes_naming(text):
    """pids of the processes whose command line holds `text`."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and text in open(f"/proc/{entry}/cmdline").read():
                pids.append(int(entry))
        except OSError:
            pass
    return pids


def stepped(run_dir):
    try:
        return any("step" in r for r in read_log(run_dir))
    except (OSError, ValueError):  # not written yet, or a line half written
        return False


@pytest.mark.full
def test_ctrl_c_stops_both_and_a_second_call_resumes_them(sequential, tmp_path, one_thread):
    out = tmp_path / "out"
    argv = [*TWO, "--parallel", "2", "--out", str(out), *AFTER]
    # its own process group, as a command at a terminal: Ctrl-C sends SIGINT to all of it
    proc = subprocess.Popen([sys.executable, "tools/gpu_schedule.py", *argv], cwd=REPO,
                            env={**os.environ, **SUBPROCESS_ENV, "OMP_NUM_THREADS": "1"},
                            start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if all(stepped(out / "runs" / m) for m in ("simclr", "simsiam")):
                os.killpg(proc.pid, signal.SIGINT)
                break
            time.sleep(0.02)
        output = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT, output
    assert live_processes_naming(str(out)) == []  # no step left behind
    rows = json.loads((out / "results.json").read_text())["methods"]
    for method in ("simclr", "simsiam"):
        assert rows[method]["status"].startswith("stopped during train after 0 of 1 epochs and")
        ckpt = torch.load(out / "runs" / method / "checkpoint.pt", weights_only=False)
        assert 0 < ckpt["batch_in_epoch"] < 6  # saved inside the epoch, at a step's end

    assert gpu_schedule.main(argv) == 0  # the same command again
    assert_same_results(sequential, out)


def test_a_resumed_run_that_rewrites_its_log_shorter_is_read_from_its_new_start(tmp_path):
    """A resumed run first rewrites log.jsonl without the records past its checkpoint (a new,
    shorter file: common/log.py, keep_until), then appends to it. The clock, which had read up
    to the old file's end, reads the new file whole lines at a time and times only the epochs
    past the checkpoint, those this process trains."""
    run_dir, log = tmp_path / "runs" / "simclr", tmp_path / "runs" / "simclr" / "log.jsonl"
    run_dir.mkdir(parents=True)

    def epoch(number, note=""):
        return json.dumps({"epoch": number, "loss": 1.0, "epoch_time": 2.0, "note": note}) + "\n"

    # stopped inside epoch 4 with the checkpoint of epoch 2: epochs 3 and 4's steps are dropped
    log.write_text(epoch(1) + epoch(2) + epoch(3) + "".join(
        json.dumps({"epoch": 4, "step": s, "loss": 1.0}) + "\n" for s in range(20)))
    torch.save({"format": FORMAT, "epoch": 2, "batch_in_epoch": 0}, run_dir / "checkpoint.pt")
    clock = gpu_schedule.EpochClock(run_dir)  # as the resumed training starts
    clock.read()
    assert clock.seen == []  # what was there before it started is not its

    # the resumed run: a new file of epochs 1-2, then epoch 3 again (a longer line than the
    # old offset's distance from it) and epoch 4
    (run_dir / "log.jsonl.tmp").write_text(epoch(1) + epoch(2))
    os.replace(run_dir / "log.jsonl.tmp", log)
    with open(log, "a") as f:
        f.write(epoch(3, note="x" * 2000))
    clock.read()
    with open(log, "a") as f:
        f.write(epoch(4) + '{"epoch": 5, "lo')  # and a line being written: left for later
    clock.read()
    assert [r["epoch"] for _, r in clock.seen] == [3, 4]

    # rewritten shorter than what was read, in the same file (truncated in place)
    with open(log, "r+") as f:
        f.truncate(0)
    log.write_text(epoch(1) + epoch(2) + epoch(3) + epoch(4) + epoch(5))
    clock.read()
    assert [r["epoch"] for _, r in clock.seen] == [3, 4, 5]  # nothing twice, nothing lost


def test_the_plan_starts_each_method_in_the_first_free_slot_if_it_fits():
    seconds = {"byol": 300, "simclr": 200, "moco": None, "swav": 100}
    order = ["byol", "simclr", "moco", "swav"]
    assert gpu_schedule.plan(order, seconds, 400, 1) == (["byol", "swav"], 400)  # 300 + 100
    assert gpu_schedule.plan(order, seconds, 400, 2) == (["byol", "simclr", "swav"], 300)
    assert gpu_schedule.plan(order, seconds, 250, 2) == (["simclr", "swav"], 200)
    assert gpu_schedule.plan(order, seconds, 99, 4) == ([], 0)
    # without a budget: when the last ends, which the speed table's estimate gives
    assert gpu_schedule.plan(order, seconds, math.inf, 2)[1] == 300


def speed_folder(folder, argv, epoch_wall, overhead=5.0, eval_seconds=None):
    """A speed test's speed.json for the settings of `argv`, as --speed-test writes it."""
    settings = benchmark.prepare(gpu_schedule.get_args(["--out", str(folder / "out"), *argv]))
    folder.mkdir(parents=True, exist_ok=True)
    rows = {m: {"epoch_wall": epoch_wall, "train_overhead_seconds": overhead}
            for m in settings["methods"]}
    (folder / "speed.json").write_text(json.dumps(
        {"settings": settings, "runs": {"1": {"methods": rows}}, "eval_seconds": eval_seconds}))
    return folder


def test_a_method_whose_estimate_does_not_fit_is_not_started(tmp_path):
    argv = [*TINY, "--methods", "simclr", "--epochs", "3"]
    speed = speed_folder(tmp_path / "speed", argv, epoch_wall=100.0)  # 3 x 100 s: over 60 s
    out = tmp_path / "out"
    # measured alone only: at most 2 side by side allowed, 1 chosen
    assert gpu_schedule.main([*argv, "--out", str(out), "--time-budget", "60", "--parallel", "2",
                              "--estimate-from", str(speed)]) == 1
    status = json.loads((out / "results.json").read_text())["methods"]["simclr"]["status"]
    # (5 s + 3 x 100 s + 120 s guessed for the evaluations) x 1.1, against the minute left
    assert status.startswith("not started: ") and status.endswith("needs ~7.8 min")
    assert not (out / "logs" / "simclr.train.log").exists()  # nothing ran

    # a speed test of other settings says nothing about these
    other = speed_folder(tmp_path / "b", [*argv, "--batch-size", "16"], epoch_wall=0.1)
    with pytest.raises(SystemExit, match=r"other settings \(batch_size\)"):
        gpu_schedule.main([*argv, "--out", str(tmp_path / "out2"), "--time-budget", "60",
                           "--estimate-from", str(other)])


def test_choose_takes_the_speed_test_that_fits_the_most_rows(tmp_path, capsys):
    """gpu_window.sh's choice of the table's flags: of two speed tests, the one whose estimates
    fit more rows of a fresh table in the budget; once the table has rows, the one of its flags."""
    argv = [*TINY, "--methods", "simclr,byol", "--epochs", "10"]
    slow = speed_folder(tmp_path / "speed", [*argv, "--", "--log-every", "1"], epoch_wall=20.0,
                        eval_seconds=10.0)  # (5 + 10 x 20 + 10) x 1.1 = 236.5 s a row
    fast = speed_folder(tmp_path / "fast", [*argv, "--", "--log-every", "2"], epoch_wall=10.0,
                        eval_seconds=10.0)  # 126.5 s a row
    out = tmp_path / "table"
    choose = [*argv, "--out", str(out), "--choose", str(slow), str(fast), "--time-budget"]
    assert gpu_schedule.main([*choose, "300"]) == 0  # one row of slow fits, both of fast
    assert capsys.readouterr().out == f"{fast}\t--log-every 2\n"
    assert gpu_schedule.main([*choose, "200"]) == 0  # one of fast only: none of slow
    assert capsys.readouterr().out == f"{fast}\t--log-every 2\n"
    assert gpu_schedule.main([*choose, "100"]) == 0  # none fits
    assert capsys.readouterr().out == "\t\n"
    # a table made with slow's flags keeps them
    (out / "results.json").write_text(json.dumps({"settings": {"extra": ["--log-every", "1"]}}))
    assert gpu_schedule.main([*choose, "300"]) == 0
    assert capsys.readouterr().out == f"{slow}\t--log-every 1\n"


@pytest.mark.full
def test_whatever_runs_at_the_end_of_the_time_budget_is_stopped(tmp_path):
    out = tmp_path / "out"
    start = time.time()
    code = gpu_schedule.main([*TINY, "--methods", "simclr", "--epochs", "100", "--out", str(out),
                              "--time-budget", "6"])
    assert code == 1 and time.time() - start < 60
    status = json.loads((out / "results.json").read_text())["methods"]["simclr"]["status"]
    assert status.startswith("stopped during train after ") and "by the time budget" in status
    assert live_processes_naming(str(out)) == []


def test_the_scheduling_flags_are_checked(tmp_path):
    base = ["--data", "cifar10", "--out", str(tmp_path)]
    # several methods side by side share one device: not with torchrun's one process per GPU
    for refused in (["--nproc-per-node", "2", "--parallel", "2"],
                    ["--nproc-per-node", "2", "--speed-test", "1,2"],
                    ["--epochs", "2", "--speed-test", "1"],  # no epoch between first and last
                    ["--estimate-from", str(tmp_path)],  # without --time-budget
                    ["--choose", str(tmp_path)], ["--speed-test", "two"], ["--parallel", "0"]):
        with pytest.raises(SystemExit):
            gpu_schedule.get_args([*base, *refused])
    args = gpu_schedule.get_args([*base, "--nproc-per-node", "2", "--epochs", "3",
                                  "--speed-test", "1", "--", "--compile"])
    assert (args.speed_test, args.parallel, args.extra) == ([1], 1, ["--compile"])


def test_the_speed_table_compares_with_the_methods_alone():
    row = lambda t, k=1: {"epoch_time": t, "epoch_wall": t + 0.5, "train_overhead_seconds": 30.0,
                          "side_by_side": k, "side_by_side_mean": k}
    speed = {"settings": {"data": "d", "arch": "resnet18", "batch_size": 512, "img_size": None,
                          "extra": [], "methods": ["byol", "simclr", "swav"]},
             "machine": {"gpus": ["GPU"], "cpu": "CPU"}, "epochs": 3, "date": "today",
             "git": "abc", "command": "python tools/gpu_schedule.py",
             "runs": {"1": {"methods": {"byol": row(2.0), "simclr": row(3.0)},
                            "wall_seconds": 40},
                      "2": {"methods": {"byol": row(3.0, 2), "simclr": row(4.5, 2),
                                        "swav": row(9.0, 1.2)}}}}
    text = gpu_schedule.speed_markdown(speed, epochs=200)
    assert "| byol | 2.00 s (2.50 s) | 3.00 s (3.50 s), 1.50x alone |" in text
    assert "| swav | – (–) | 9.00 s (9.50 s), 1.2 side by side on average |" in text
    # two at once, each 1.5x slower: 2 x (2 + 3) / (3 + 4.5) = 1.33x the epochs per second
    assert "| epochs per second, relative to alone | 1.00x | 1.33x |" in text
    # swav was not measured alone: no estimate of the table alone; side by side, byol
    # (30 + 200 x 3.5 = 730 s) then swav (30 + 200 x 9.5 = 1930 s) in one slot, simclr
    # (30 + 200 x 5 = 1030 s) in the other: 2660 s
    assert "| 200-epoch training of every row, estimated | – | " \
           "44.3 min (longest row 32.2) |" in text


@pytest.mark.full
def test_a_gpu_session_on_the_cpu_leaves_small_files_and_the_next_one_resumes(tmp_path):
    """tools/gpu_window.sh with tiny settings: a speed test, then the row it says fits; only
    small files in OUT; a second session on a fresh machine (no run folders) finds the row done."""
    table = tmp_path / "repo-table"  # the table as the repository would hold it
    env = {**os.environ, **SUBPROCESS_ENV, "TABLE": str(table), "DATA": "synthetic",
           "METHODS": "simsiam", "EPOCHS": "1", "SPEED_EPOCHS": "3", "SIDE_BY_SIDE": "1",
           "COMPILE_SIDE_BY_SIDE": "", "TESTS": "", "BUDGET": "300", "REVISION": "abc1234",
           "SETTINGS": "--arch resnet18 --img-size 16 --synthetic-size 64 --batch-size 32 "
                       "--workers 0 --linear cached --linear-epochs 2 --linear-batch-size 16",
           "SCRIPT_FLAGS": "--log-every 1 --checkpoint-every 50"}  # as its default: rare saves

    def session(name):
        out, scratch = tmp_path / name, tmp_path / f"{name}-scratch"
        proc = subprocess.run(["bash", "tools/gpu_window.sh"], cwd=REPO, capture_output=True,
                              text=True, timeout=280, env={**env, "OUT": str(out),
                                                           "SCRATCH": str(scratch)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return out / str(table).lstrip("/"), proc.stdout

    here, printed = session("first")
    row = json.loads((here / "results.json").read_text())["methods"]["simsiam"]
    # REVISION is what a copy of the repository without .git records; this one has git's
    assert row["status"] == "done", printed
    assert re.fullmatch(r"[0-9a-f]{7,}(\+uncommitted)?", row["git"]) or row["git"] == "abc1234"
    speed = json.loads((here / "speed" / "speed.json").read_text())
    assert speed["eval_seconds"] > 0  # the evaluation's time, which the estimates add
    timed = speed["runs"]["1"]["methods"]["simsiam"]
    assert timed["epoch_wall"] > 0 and timed["train_overhead_seconds"] > 0
    assert "expected to finish: simsiam" in printed
    files = [p for p in (tmp_path / "first").rglob("*") if p.is_file()]
    assert files and max(p.stat().st_size for p in files) < 1_000_000
    assert not [p for p in files if p.suffix == ".pt"]  # the checkpoints stayed behind
    assert (here / "records" / "simsiam" / "log.jsonl").exists()

    shutil.copytree(here, table)  # what the repository keeps between sessions
    again, printed = session("second")
    assert "simsiam: done (the row is kept: its run folder is not here)" in printed
    assert commands(again, "simsiam", "train") == 1  # nothing trained again
    assert json.loads((again / "results.json").read_text())["methods"]["simsiam"] == row
