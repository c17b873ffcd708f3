"""tools/plot.py: the plotted data (series, labels, values) from run directories, what is drawn
(through a stand-in for matplotlib that records the calls: short numbered labels, the differing
flags below the panels, the optional panels), and the one line without it."""
import json
import sys
import types

import pytest

from tools import plot


def make_run(root, name, argv0, records, **args):
    run_dir = root / name
    run_dir.mkdir()
    base = {"argv": [argv0, "--data", "x"], "lr": 1.0, "batch_size": 256, "run_dir": str(run_dir),
            "workers": 3, "git": "abc"}
    (run_dir / "args.json").write_text(json.dumps({**base, **args}))
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    steps = [{"epoch": 0, "step": 1, "loss": 9.0}, {"epoch": 0, "step": 2, "loss": 8.0}]
    a = make_run(tmp_path, "a", "/repo/simclr.py", [
        {"epoch": 0, "knn_top1": 30.0}, *steps,
        {"epoch": 1, "loss": 8.5, "lr": 0.5, "img_per_s": 100.0, "knn_top1": 35.0},
        {"epoch": 2, "loss": 7.5, "lr": 0.25, "img_per_s": 110.0}], temperature=0.5)
    b = make_run(tmp_path, "b", "simclr.py", [
        {"epoch": 1, "loss": 8.0, "lr": 1.0, "img_per_s": 90.0}], temperature=0.5,
        batch_size=512, workers=7)
    c = make_run(tmp_path, "c", "byol.py", [
        {"epoch": 0, "knn_top1": 31.0},
        {"epoch": 1, "loss": 3.0, "lr": 0.2, "img_per_s": 50.0, "knn_top1": 33.0}],
        tau_base=0.99)
    return [a, b, c]


def test_series_and_labels(runs):
    curves = plot.collect(runs)
    # runs of one method are numbered and differ by their batch size (workers and run_dir are
    # left out); a lone run of another method is labelled by its method alone
    assert [c["label"] for c in curves] == ["simclr #1", "simclr #2", "byol"]
    assert [c["flags"] for c in curves] == ["batch_size=256", "batch_size=512", ""]
    a, b, c = (c["series"] for c in curves)
    assert a["loss"] == {"epoch": [1, 2], "value": [8.5, 7.5]}  # epoch records, not steps
    assert a["lr"] == {"epoch": [1, 2], "value": [0.5, 0.25]}
    assert a["knn_top1"] == {"epoch": [0, 1], "value": [30.0, 35.0]}  # with the random init
    assert a["img_per_s"] == {"epoch": [1, 2], "value": [100.0, 110.0]}
    assert b["knn_top1"] == {"epoch": [], "value": []}
    assert c["loss"]["value"] == [3.0] and c["knn_top1"]["epoch"] == [0, 1]


class Recorder:
    """Stands in for matplotlib: records what each panel is given."""

    def __init__(self):
        self.panels, self.saved = [], None
        self.pyplot = types.SimpleNamespace(subplots=self.subplots, close=lambda fig: None)

    def use(self, backend):
        self.backend = backend

    def subplots(self, rows, cols, figsize):
        recorder = self
        self.grid = (rows, cols)

        class Axes:
            def __init__(self):
                self.lines, self.labels, self.colours, self.visible = [], {}, [], True
                self.xaxis = types.SimpleNamespace(set_major_locator=lambda locator: None)
                recorder.panels.append(self)

            def plot(self, x, y, marker=None, label=None, color=None):
                self.lines.append((label, list(x), list(y)))
                self.colours.append(color)

            def set_xlabel(self, text):
                self.labels["x"] = text

            def set_ylabel(self, text):
                self.labels["y"] = text

            def grid(self, **kw):
                pass

            def legend(self, **kw):
                self.legend_shown = True

            def set_visible(self, visible):
                self.visible = visible

        class Grid:
            flat = [Axes() for _ in range(rows * cols)]

        class Figure:
            def suptitle(self, text):
                recorder.title = text

            def tight_layout(self, rect=None):
                pass

            def get_figheight(self):
                return figsize[1]

            def text(self, x, y, text, **kw):
                recorder.note = text

            def savefig(self, out, dpi):
                recorder.saved = str(out)

        return Figure(), Grid()


def test_what_is_drawn(runs, tmp_path, monkeypatch):
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "matplotlib", recorder)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", recorder.pyplot)
    monkeypatch.setitem(sys.modules, "matplotlib.ticker",
                        types.SimpleNamespace(MaxNLocator=lambda integer: None))
    assert plot.main([*map(str, runs), "-o", str(tmp_path / "c.png"), "--title", "t"]) == 0
    assert recorder.saved == str(tmp_path / "c.png") and recorder.backend == "Agg"
    # no run logged probe_top1 or epoch_time: four panels, drawn in a 2 x 2 grid
    assert recorder.grid == (2, 2)
    loss, lr, knn, speed = recorder.panels
    assert [p.labels["y"] for p in recorder.panels] == [plot.METRICS[m] for m in plot.ALWAYS_DRAWN]
    assert loss.lines == [("simclr #1", [1, 2], [8.5, 7.5]), ("simclr #2", [1], [8.0]),
                          ("byol", [1], [3.0])]
    assert knn.lines == [("simclr #1", [0, 1], [30.0, 35.0]),
                         ("byol", [0, 1], [31.0, 33.0])]  # a run without kNN draws no line
    assert speed.lines[0][2] == [100.0, 110.0] and loss.legend_shown
    assert loss.colours == ["C0", "C1", "C2"] and knn.colours == ["C0", "C2"]  # run by run
    # what tells the numbered runs apart is written below the panels, not in the legend
    assert recorder.note == "simclr #1: batch_size=256\nsimclr #2: batch_size=512"


def test_probe_epoch_time_and_collapse_panels_when_logged(tmp_path, monkeypatch):
    recorder = Recorder()
    monkeypatch.setitem(sys.modules, "matplotlib", recorder)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", recorder.pyplot)
    monkeypatch.setitem(sys.modules, "matplotlib.ticker",
                        types.SimpleNamespace(MaxNLocator=lambda integer: None))
    run = make_run(tmp_path, "p", "byol.py", [
        {"epoch": 1, "loss": 3.0, "lr": 0.2, "img_per_s": 50.0, "probe_top1": 40.0,
         "embedding_std": 0.05},
        {"epoch": 2, "loss": 2.0, "lr": 0.1, "img_per_s": 52.0, "probe_top1": 45.0,
         "epoch_time": 12.5, "embedding_std": 0.04}])
    assert plot.main([str(run), "-o", str(tmp_path / "c.png")]) == 0
    assert recorder.grid == (4, 2)  # seven panels, the eighth hidden
    probe, epoch_time, collapse, spare = recorder.panels[4:]
    assert probe.labels["y"] == plot.METRICS["probe_top1"]
    assert probe.lines == [("byol", [1, 2], [40.0, 45.0])]
    assert epoch_time.lines == [("byol", [2], [12.5])]
    assert collapse.lines == [("byol", [1, 2], [0.05, 0.04])]
    assert all(p.visible for p in recorder.panels[:7]) and not spare.visible
    assert not hasattr(recorder, "note")  # a lone run: nothing to tell apart


def test_without_matplotlib_one_line_and_the_data_still_written(runs, tmp_path, monkeypatch,
                                                                  capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    code = plot.main([*map(str, runs), "--json", str(tmp_path / "data.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install matplotlib" in err[0]
    assert json.loads((tmp_path / "data.json").read_text()) == plot.collect(runs)


def test_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert plot.main([str(tmp_path), "--json", str(tmp_path / "x.json")]) == 2
    assert "not a run directory" in capsys.readouterr().err
