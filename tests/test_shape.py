"""The shape the project promises a reader who copies one script: a main() that shows the method
rather than the plumbing every script repeats, common/ imported one way only, short lines."""
import ast
import collections
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
METHODS = ("simclr", "moco", "byol", "simsiam", "swav", "barlow", "vicreg", "mocov3", "dino", "mae")


def main_lines(script):
    """The non-blank, non-comment lines of a script's main(), stripped (a trailing comment cut)."""
    source = (REPO / f"{script}.py").read_text()
    main = next(node for node in ast.parse(source).body
                if isinstance(node, ast.FunctionDef) and node.name == "main")
    lines = source.splitlines()[main.lineno - 1:main.end_lineno]
    lines = [re.sub(r"\s+#.*$", "", line).strip() for line in lines]
    return [line for line in lines if line and not line.startswith("#")]


def test_main_shows_the_method_not_the_plumbing():
    """At most 40 lines identical in all the main()s: the rest is each method's own."""
    counts = [collections.Counter(main_lines(m)) for m in METHODS]
    shared = counts[0]
    for other in counts[1:]:
        shared &= other
    assert sum(shared.values()) <= 40, sorted(shared.elements())


def common_imports(path):
    """The common modules that a file imports anywhere in it (inside functions too)."""
    tree = ast.parse(path.read_text())
    return {node.module.split(".")[1] for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
            and node.module.startswith("common.")}


def test_common_imports_go_one_way():
    """No module of common/ imports, even lazily, one that imports it back (directly or not)."""
    graph = {p.stem: common_imports(p) for p in (REPO / "common").glob("*.py")}

    def reachable(start):
        seen, todo = set(), list(graph.get(start, ()))
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo += graph.get(module, ())
        return seen
    assert not [m for m in graph if m in reachable(m)]


@pytest.mark.parametrize("script", [*METHODS, "linear_eval", "finetune"])
def test_a_script_stays_short(script):
    lines = [line for line in (REPO / f"{script}.py").read_text().splitlines() if line.strip()]
    assert len(lines) <= 400


def test_no_line_longer_than_111_characters():
    files = [*REPO.glob("*.py"), *REPO.glob("common/*.py"), *REPO.glob("tools/*.py"),
             *REPO.glob("tests/**/*.py")]
    long = [f"{f.relative_to(REPO)}:{n}" for f in files
            for n, line in enumerate(f.read_text().splitlines(), 1) if len(line) > 111]
    assert not long


def test_import_loads_neither_optional_nor_evaluation_modules():
    """Importing the method scripts loads only what every run needs: not the ViT code, the GPU
    augmentation, the probe, the tracking sinks, Slurm's helpers, the named datasets, SyncBN's
    groups, the widened ResNet-50s, --allow-changes, the failure reports, or linear_eval.py's
    own; and what it loads of common/ is at most 2,000 lines, what a copied script carries."""
    optional = {"vit", "gpu_aug", "probe", "track", "slurm", "evaluation", "weights", "named_data",
                "sync_bn", "widened_resnet", "allow_changes", "failures"}
    code = ("import sys; [__import__(m) for m in sys.argv[1:]]; "
            "print(' '.join(m.split('.')[1] for m in sys.modules if m.startswith('common.')))")
    loaded = subprocess.run([sys.executable, "-c", code, *METHODS], cwd=REPO, text=True,
                            capture_output=True, check=True).stdout.split()
    assert "run" in loaded and not optional & set(loaded), sorted(loaded)
    lines = sum(len((REPO / "common" / f"{m}.py").read_text().splitlines())
                for m in [*loaded, "__init__"])  # of all the scripts together, so of each too
    assert lines <= 2000, f"the method scripts load {lines} lines of common/"
