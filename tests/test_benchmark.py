"""tools/benchmark.py on tiny synthetic runs: a method that fails is reported and the next one
still runs; the table holds the runs' own numbers, with the hardware and the versions of
common/args.py; a second call skips what is done and resumes what is not; other settings need
another --out; the README's tables are rendered from the JSON; a class-balanced subset is linked;
the commands of a multi-GPU benchmark. Methods side by side, time budgets, speed tests and the GPU
sessions of tools/gpu_window.sh: tests/test_gpu_schedule.py."""
import json
import sys

import pytest

from common.args import git_revision, versions
from tools import benchmark
from tests.helpers import make_image_folder, read_log

TINY = ["--data", "synthetic", "--synthetic-size", "64", "--arch", "resnet18", "--img-size", "16",
        "--epochs", "1", "--batch-size", "32", "--workers", "0", "--linear", "cached",
        "--linear-epochs", "2", "--linear-batch-size", "16"]
# moco is given a flag it does not know: it fails at once, and simclr, next, still runs
ARGV = [*TINY, "--methods", "moco,simclr", "--method-flags", "moco=--no-such-flag"]


@pytest.fixture(scope="module")
def bench(module_tmp):
    out = module_tmp("bench") / "out"
    code = benchmark.main([*ARGV, "--out", str(out), "--", "--log-every", "1"])
    return out, code


def commands(out, method, step):
    """How many times the step's command ran: its log holds a `$ command` line for each."""
    return (out / "logs" / f"{method}.{step}.log").read_text().count("$ ")


@pytest.mark.full  # whole benchmark runs: the full suite
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
    assert "benchmark.py" in results["command"]
    # the revision and the versions are common/args.py's; the hardware is the benchmark's own
    assert results["git"] == git_revision(short=True) and simclr["git"] == results["git"]
    assert {k: results["machine"][k] for k in versions()} == versions()
    assert results["machine"]["cpu"] and results["machine"]["memory_gib"] > 0


@pytest.mark.full
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
    assert simclr["epoch_time"] == log[-1]["epoch_time"]  # one epoch: nothing to leave out
    assert simclr["peak_gpu_mem_gib"] is None and simclr["train_seconds"] > 0  # on the CPU
    assert linear["epochs"] == 2 and linear["protocol"] == "cached centre-crop features"
    # kept with the results: the curves' data
    assert read_log(out / simclr["records"]) == log
    # one epoch gives points, not curves: no figure (tools/plot.py is tested on its own), and
    # no GPU: no peak-memory column; one step after another: no side-by-side column
    assert not (out / "curves.png").exists()
    table = (out / "results.md").read_text()
    assert "Peak GPU memory" not in table and "side by side" not in table
    assert "| Method | Epoch time | kNN + linear evaluation |" in table


@pytest.mark.full
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


@pytest.mark.full
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
    # the scheduling's flags are tools/gpu_schedule.py's (tests/test_gpu_schedule.py)
    with pytest.raises(SystemExit):
        benchmark.get_args(["--data", "cifar10", "--out", str(tmp_path), "--parallel", "2"])
