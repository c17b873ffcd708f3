"""tools/benchmark.py on tiny synthetic runs: a method that fails is reported while the one beside
it still runs; the table holds the runs' own numbers; a second call skips what is done and resumes
what is not; other settings need another --out; the README's tables are rendered from the JSON.
Methods side by side (--parallel) give what a sequential run gives, also when stopped by Ctrl-C
and resumed; --time-budget starts only what fits and stops what still runs at its end; a GPU
session of tools/gpu_window.sh, run on the CPU with tiny settings, leaves only small files and the
next session resumes from them."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tools import benchmark
from tests.helpers import REPO, SUBPROCESS_ENV, assert_same_tensors, make_image_folder, read_log

pytestmark = pytest.mark.full  # whole benchmark runs: the full suite

TINY = ["--data", "synthetic", "--synthetic-size", "64", "--arch", "resnet18", "--img-size", "16",
        "--epochs", "1", "--batch-size", "32", "--workers", "0", "--linear", "cached",
        "--linear-epochs", "2", "--linear-batch-size", "16"]
# moco is given a flag it does not know: it fails at once, while simclr trains beside it
ARGV = [*TINY, "--methods", "moco,simclr", "--method-flags", "moco=--no-such-flag",
        "--parallel", "2"]


@pytest.fixture(scope="module")
def bench(module_tmp):
    out = module_tmp("bench") / "out"
    code = benchmark.main([*ARGV, "--out", str(out), "--", "--log-every", "1"])
    return out, code


def commands(out, method, step):
    return (out / "logs" / f"{method}.{step}.log").read_text().count("$ ")


def test_a_failed_method_is_reported_and_the_others_run(bench):
    out, code = bench
    assert code == 1  # not every method finished
    results = json.loads((out / "results.json").read_text())
    moco, simclr = results["methods"]["moco"], results["methods"]["simclr"]
    assert moco["status"].startswith("failed at train (exit 2)")
    assert "--no-such-flag" in moco["status"]
    assert simclr["status"] == "done"
    table = (out / "results.md").read_text()
    assert "| moco | failed at train (exit 2)" in table
    assert "| simclr | 1 | 32 |" in table
    assert results["settings"]["extra"] == ["--log-every", "1"]
    assert results["git"] and results["machine"]["torch"] and "benchmark.py" in results["command"]


def test_the_table_holds_the_runs_own_numbers(bench):
    out, _ = bench
    simclr = json.loads((out / "results.json").read_text())["methods"]["simclr"]
    log = read_log(out / "runs" / "simclr")
    assert simclr["knn_top1_init"] == log[0]["knn_top1"] and log[0]["epoch"] == 0
    knn = json.loads((out / "eval" / "simclr-knn" / "result.json").read_text())
    linear = json.loads((out / "eval" / "simclr-linear" / "result.json").read_text())
    assert simclr["knn_top1"] == knn["knn_top1"]
    assert (simclr["linear_top1"], simclr["linear_top5"]) == (linear["top1"], linear["top5"])
    assert simclr["img_per_s"] == pytest.approx(log[-1]["img_per_s"])  # one epoch
    assert simclr["peak_gpu_mem_gib"] is None and simclr["train_seconds"] > 0  # on the CPU
    assert linear["epochs"] == 2 and linear["protocol"] == "cached centre-crop features"
    # one epoch gives points, not curves: no figure (tools/plot.py is tested on its own), and
    # no GPU: no peak-memory column
    assert not (out / "curves.png").exists()
    assert "Peak GPU memory" not in (out / "results.md").read_text()


def test_a_second_call_skips_what_is_done_and_resumes_what_is_not(bench, capsys):
    out, _ = bench
    (out / "eval" / "simclr-linear" / "result.json").unlink()
    assert benchmark.main([*ARGV, "--out", str(out), "--", "--log-every", "1"]) == 1
    printed = capsys.readouterr().out
    assert "simclr: train already done" in printed and "simclr: knn already done" in printed
    assert (commands(out, "simclr", "train"), commands(out, "simclr", "knn")) == (1, 1)
    assert commands(out, "simclr", "linear") == 2  # run again: it resumed its finished run
    assert commands(out, "moco", "train") == 2  # a failure is tried again
    simclr = json.loads((out / "results.json").read_text())["methods"]["simclr"]
    assert simclr["status"] == "done" and "linear_top1" in simclr

    # the same --out with other settings is refused
    assert benchmark.main([*ARGV, "--out", str(out), "--epochs", "2"]) == 2
    assert "other settings (epochs, extra)" in capsys.readouterr().err


def test_the_readme_tables_are_rendered_from_the_json(bench, tmp_path):
    out, _ = bench
    readme = out.parent / "README.md"
    readme.write_text(f"# x\n<!-- results: {out.name} -->\nold table\n<!-- /results -->\nend\n")
    assert benchmark.main(["--render-readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old table" not in text and text.endswith("<!-- /results -->\nend\n")
    assert "| simclr | 1 | 32 |" in text
    assert "synthetic; resnet18, 1 epoch, 16 px, batch 32, --log-every 1; linear probe: cached" in text

    # a page of one method: its row only, the figure's path relative to the page
    page = out.parent / "docs" / "simclr.md"
    page.parent.mkdir()
    page.write_text(f"<!-- results: ../{out.name} methods=simclr -->\n<!-- /results -->\n")
    assert benchmark.main(["--render-readme", str(readme), str(page)]) == 0
    text = page.read_text()
    assert "| simclr | 1 | 32 |" in text and "| moco |" not in text
    assert f"](../{out.name}/curves.png)" in text or not (out / "curves.png").exists()
    assert readme.read_text().count("| moco |") == 1  # the README's block is unchanged
    page.write_text(f"<!-- results: ../{out.name} methods=dino -->\n<!-- /results -->\n")
    with pytest.raises(SystemExit, match="no dino in"):
        benchmark.main(["--render-readme", str(page)])


def test_a_class_balanced_subset_is_linked(tmp_path):
    root = make_image_folder(tmp_path / "images", classes=3, train_per_class=5, val_per_class=2)
    out = benchmark.subset(root, tmp_path / "subset", {"train": 2, "val": None})
    train = sorted(p.relative_to(out).as_posix() for p in (out / "train").rglob("*.jpg"))
    assert train == [f"train/class{c}/{i}.jpg" for c in range(3) for i in (0, 1)]
    assert len(list((out / "val").rglob("*.jpg"))) == 6  # a split without a number: all of it
    assert all(p.is_symlink() for p in out.rglob("*.jpg"))


def test_the_commands_of_a_multi_gpu_benchmark(tmp_path):
    args = benchmark.get_args(["--data", "cifar10", "--out", str(tmp_path), "--methods", "byol",
                               "--nproc-per-node", "8", "--epochs", "200", "--method-flags",
                               "byol=--tau-base 0.99", "--", "--data-on-device"])
    (train, cmd, _), (knn, knn_cmd, _), (linear, linear_cmd, _) = benchmark.steps(args, "byol")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    assert cmd[:6] == [*torchrun, "byol.py"] and knn_cmd[:6] == [*torchrun, "linear_eval.py"]
    assert cmd[-3:] == ["--tau-base", "0.99", "--data-on-device"]  # the method's, then all's
    assert ["--epochs", "200"] == cmd[cmd.index("--epochs"):cmd.index("--epochs") + 2]
    assert "--knn" in knn_cmd and "--knn" not in linear_cmd
    assert linear_cmd[linear_cmd.index("--ckpt") + 1] == str(tmp_path / "runs/byol/backbone.pt")

    # several methods side by side share one device: not with torchrun's one process per GPU
    with pytest.raises(SystemExit):
        benchmark.get_args(["--data", "cifar10", "--out", str(tmp_path), "--nproc-per-node", "2",
                            "--parallel", "2"])


# ------------------------------------------------------------------------------- side by side

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


def test_methods_side_by_side_give_the_sequential_results(sequential, tmp_path):
    out = tmp_path / "out"
    assert benchmark.main([*TWO, "--parallel", "2", "--out", str(out), *AFTER]) == 0
    assert_same_results(sequential, out)
    rows = {folder: json.loads((folder / "results.json").read_text())["methods"]
            for folder in (sequential, out)}
    assert {r["side_by_side"] for r in rows[sequential].values()} == {1}
    assert {r["side_by_side"] for r in rows[out].values()} == {2}  # they did overlap
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


def test_ctrl_c_stops_both_and_a_second_call_resumes_them(sequential, tmp_path, one_thread):
    out = tmp_path / "out"
    argv = [*TWO, "--parallel", "2", "--out", str(out), *AFTER]
    # its own process group, as a command at a terminal: Ctrl-C sends SIGINT to all of it
    proc = subprocess.Popen([sys.executable, "tools/benchmark.py", *argv], cwd=REPO,
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

    assert benchmark.main(argv) == 0  # the same command again
    assert_same_results(sequential, out)


# ------------------------------------------------------------------------------- time budget

def test_the_plan_starts_each_method_in_the_first_free_slot_if_it_fits():
    seconds = {"byol": 300, "simclr": 200, "moco": None, "swav": 100}
    order = ["byol", "simclr", "moco", "swav"]
    assert benchmark.plan(order, seconds, 400, 1) == ["byol", "swav"]  # 300 + 100
    assert benchmark.plan(order, seconds, 400, 2) == ["byol", "simclr", "swav"]  # swav at 200
    assert benchmark.plan(order, seconds, 250, 2) == ["simclr", "swav"]
    assert benchmark.plan(order, seconds, 99, 4) == []


def speed_folder(tmp_path, argv, epoch_wall, overhead=5.0):
    """A speed test's speed.json for the settings of `argv`, as --speed-test writes it."""
    settings = benchmark.settings_of(benchmark.get_args([*argv, "--out", str(tmp_path)]))
    folder = tmp_path / "speed"
    folder.mkdir(parents=True)
    row = {"epoch_wall": epoch_wall, "train_overhead_seconds": overhead}
    (folder / "speed.json").write_text(json.dumps(
        {"settings": settings, "runs": {"1": {"methods": {"simclr": row}}}}))
    return folder


def test_a_method_whose_estimate_does_not_fit_is_not_started(tmp_path):
    argv = [*TINY, "--methods", "simclr", "--epochs", "3"]
    speed = speed_folder(tmp_path, argv, epoch_wall=100.0)  # 3 x 100 s: more than 60 s
    out = tmp_path / "out"
    # measured alone only: at most 2 side by side allowed, 1 chosen
    assert benchmark.main([*argv, "--out", str(out), "--time-budget", "60", "--parallel", "2",
                           "--estimate-from", str(speed)]) == 1
    status = json.loads((out / "results.json").read_text())["methods"]["simclr"]["status"]
    # (5 s + 3 x 100 s + 120 s guessed for the evaluations) x 1.1, against the minute left
    assert status.startswith("not started: ") and status.endswith("needs ~7.8 min")
    assert not (out / "logs" / "simclr.train.log").exists()  # nothing ran

    # a speed test of other settings says nothing about these
    other = speed_folder(tmp_path / "b", [*argv, "--batch-size", "16"], epoch_wall=0.1)
    with pytest.raises(SystemExit, match=r"other settings \(batch_size\)"):
        benchmark.main([*argv, "--out", str(tmp_path / "out2"), "--time-budget", "60",
                        "--estimate-from", str(other)])


def test_whatever_runs_at_the_end_of_the_time_budget_is_stopped(tmp_path):
    out = tmp_path / "out"
    start = time.time()
    code = benchmark.main([*TINY, "--methods", "simclr", "--epochs", "100", "--out", str(out),
                           "--time-budget", "6"])
    assert code == 1 and time.time() - start < 60
    status = json.loads((out / "results.json").read_text())["methods"]["simclr"]["status"]
    assert status.startswith("stopped during train after ") and "by the time budget" in status
    assert live_processes_naming(str(out)) == []


def test_the_speed_table_compares_with_the_methods_alone():
    row = lambda t, k=1: {"epoch_time": t, "epoch_wall": t + 0.5, "train_overhead_seconds": 30.0,
                          "side_by_side": k, "side_by_side_mean": k}
    speed = {"settings": {"data": "d", "arch": "resnet18", "batch_size": 512, "img_size": None,
                          "extra": [], "methods": ["byol", "simclr", "swav"]},
             "machine": {"gpus": ["GPU"], "cpu": "CPU"}, "epochs": 3, "date": "today",
             "git": "abc", "command": "python tools/benchmark.py",
             "runs": {"1": {"methods": {"byol": row(2.0), "simclr": row(3.0)},
                            "wall_seconds": 40},
                      "2": {"methods": {"byol": row(3.0, 2), "simclr": row(4.5, 2),
                                        "swav": row(9.0, 1.2)}}}}
    text = benchmark.speed_markdown(speed, epochs=200)
    assert "| byol | 2.00 s (2.50 s) | 3.00 s (3.50 s), 1.50x alone |" in text
    assert "| swav | – (–) | 9.00 s (9.50 s), 1.2 side by side on average |" in text
    # two at once, each 1.5x slower: 2 x (2 + 3) / (3 + 4.5) = 1.33x the epochs per second
    assert "| epochs per second, relative to alone | 1.00x | 1.33x |" in text
    # swav was not measured alone: no estimate of the table alone; side by side, byol
    # (30 + 200 x 3.5 = 730 s) then swav (30 + 200 x 9.5 = 1930 s) in one slot, simclr
    # (30 + 200 x 5 = 1030 s) in the other: 2660 s
    assert "| 200-epoch training of every row, estimated | – | " \
           "44.3 min (longest row 32.2) |" in text


# ------------------------------------------------------------------------------- a GPU session

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
