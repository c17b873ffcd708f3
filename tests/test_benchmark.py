"""tools/benchmark.py on tiny synthetic runs: a method that fails is reported and the next one
still runs; the table holds the runs' own numbers; a second call skips what is done and resumes
what is not; other settings need another --out; the README's tables are rendered from the JSON."""
import importlib.util
import json
import sys

import pytest

from tools import benchmark
from tests.helpers import make_image_folder, read_log

TINY = ["--data", "synthetic", "--synthetic-size", "64", "--arch", "resnet18", "--img-size", "16",
        "--epochs", "1", "--batch-size", "32", "--workers", "0", "--linear", "cached",
        "--linear-epochs", "2", "--linear-batch-size", "16"]
# moco is given a flag it does not know: it fails at once, before simclr runs
ARGV = [*TINY, "--methods", "moco,simclr", "--method-flags", "moco=--no-such-flag"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
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
    # the figure is drawn where matplotlib is installed, and said to be missing elsewhere
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (out / "curves.png").exists() == has_matplotlib


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
