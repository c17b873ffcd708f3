"""The documentation says only what the code does: every command in a fenced block names a script
that exists and flags that script's parser knows; every flag a page names in backticks exists;
every relative link and anchor resolves; every results block is what its results.json renders;
each method's page and script point to each other, and the names a page gives for the script's
parts exist in it. Each check collects all failures of all pages, so one run lists them all."""
import contextlib
import importlib
import importlib.util
import io
import re
import runpy
import shlex
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from tools import benchmark

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
METHODS = ["simclr", "moco", "byol", "simsiam", "swav", "barlow", "vicreg", "mocov3", "dino", "mae"]
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*(?![\w])")  # ours are kebab-case, never snake_case

# Flags of other programs that pages name in backticks: the launchers and, on the method pages,
# the official codebases' own flags (to say which of ours matches them).
FOREIGN = {
    # torchrun, sbatch, srun, pytest
    "--nnodes", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id", "--standalone",
    "--shutdown-timeout", "--nodes", "--time", "--signal", "--no-requeue", "--requeue",
    "--gpus-per-node", "--ntasks-per-node", "--cpus-per-task", "--partition", "--account",
    "--kill-on-bad-exit", "--open-mode", "--output", "--batch", "--durations",
    "--full",  # this repository's pytest option (tests/conftest.py)
}
FOREIGN_BY_PAGE = {
    "docs/training.md": {"--eta",       # BYOL-HPC's name of our --lars-eta
                         "--warmup"},   # the example of an abbreviation the scripts refuse
}


def page_name(page):
    return page.relative_to(REPO).as_posix()


@lru_cache(maxsize=None)
def flags_of(script):
    """The flags in `python SCRIPT --help`, run in this process (no subprocess start-up)."""
    out, argv = io.StringIO(), sys.argv
    sys.argv = [script, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            runpy.run_path(str(REPO / script), run_name="__main__")
    finally:
        sys.argv = argv
    flags = set(FLAG.findall(out.getvalue()))
    assert "--help" in flags, f"{script} --help printed no usage"
    return frozenset(flags)


def fenced_blocks(text):
    return re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.S | re.M)


def commands(text):
    """Each shell command of the page's bash blocks as a token list (continuations joined,
    comments dropped)."""
    for block in fenced_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                yield tokens


def script_and_flags(tokens):
    """(script, flags given to it, flags after a bare `--`) of a command that runs one of ours."""
    scripts = [i for i, t in enumerate(tokens) if t.endswith(".py")]
    if tokens[0] not in ("python", "torchrun", "sbatch", "srun") or not scripts:
        return None
    i = scripts[0]
    rest = tokens[i + 1:]
    after = rest[rest.index("--") + 1:] if "--" in rest else []
    given = rest[:rest.index("--")] if "--" in rest else rest
    flags = lambda ts: {t.split("=")[0] for t in ts if FLAG.fullmatch(t.split("=")[0])}
    return tokens[i], flags(given), flags(after)


def test_every_command_runs_a_script_that_exists_with_flags_it_knows():
    problems, seen = [], 0
    for page in PAGES:
        for tokens in commands(page.read_text()):
            parsed = script_and_flags(tokens)
            if parsed is None:
                continue
            script, flags, passed_on = parsed
            seen += 1
            if not (REPO / script).is_file():
                problems.append(f"{page_name(page)}: no script {script}: {' '.join(tokens)}")
                continue
            for flag in sorted(flags - flags_of(script)):
                problems.append(f"{page_name(page)}: {script} has no {flag}: {' '.join(tokens)}")
            # after `--`, tools/benchmark.py hands the flags to every method script
            for flag in sorted(f for f in passed_on
                               if any(f not in flags_of(f"{m}.py") for m in METHODS)):
                problems.append(f"{page_name(page)}: not every method has {flag}")
    assert seen > 30, f"only {seen} commands found: is the parser still reading the blocks?"
    assert not problems, "\n".join(problems)


def test_every_flag_named_in_backticks_exists():
    ours = set().union(*(flags_of(s) for s in [f"{m}.py" for m in METHODS] + [
        "linear_eval.py", "finetune.py", "tools/benchmark.py", "tools/gpu_schedule.py", "tools/plot.py"] + [
        p.relative_to(REPO).as_posix() for p in sorted((REPO / "tests/benchmarks").glob("*.py"))]))
    problems = []
    for page in PAGES:
        name = page_name(page)
        method = page.stem if page.parent.name == "docs" and page.stem in METHODS else None
        # a method's page names its own script's flags (and the evaluation's and benchmark's)
        allowed = (flags_of(f"{method}.py") | flags_of("linear_eval.py") | flags_of("finetune.py")
                   | flags_of("tools/benchmark.py")) if method else ours
        allowed = allowed | FOREIGN | FOREIGN_BY_PAGE.get(name, set())
        # fenced commands are the test above's; results blocks are rendered (their command line
        # holds every method's flags) and checked against their JSON below
        text = re.sub(r"^```.*?^```|<!-- results: .*?<!-- /results -->", "", page.read_text(),
                      flags=re.S | re.M)
        for span in re.findall(r"`([^`\n]+)`", text):
            for flag in FLAG.findall(span):
                if flag not in allowed:
                    problems.append(f"{name}: `{span}`: {flag} is not a flag of "
                                    + (f"{method}.py" if method else "any script"))
    assert not problems, "\n".join(problems)


def slug(heading):
    """GitHub's anchor of a heading."""
    heading = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {slug(h) for h in re.findall(r"^#{1,6} (.*)$", text, flags=re.M)}


def test_every_relative_link_and_anchor_resolves():
    problems, seen = [], 0
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            seen += 1
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                problems.append(f"{page_name(page)}: ({target}): no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file):
                problems.append(f"{page_name(page)}: ({target}): no heading #{anchor}")
    assert seen > 40
    assert not problems, "\n".join(problems)


def test_the_anchor_rule_is_githubs():
    # the control of the check above: these are the anchors GitHub gives these headings
    assert slug("Preemption, time limits and requeue") == "preemption-time-limits-and-requeue"
    assert slug("Training: data, flags, outputs, resuming") == "training-data-flags-outputs-resuming"
    assert slug("The `--gpu-aug` path") == "the---gpu-aug-path"


def test_every_results_block_is_what_its_json_renders():
    import json
    blocks = 0
    for page in PAGES:
        pattern = r"<!-- results: (\S+?)(?: methods=(\S+))? -->\n(.*?)<!-- /results -->"
        for folder, methods, body in re.findall(pattern, page.read_text(), flags=re.S):
            blocks += 1
            results = json.loads((page.parent / folder / "results.json").read_text())
            rendered = benchmark.markdown(results, folder, methods.split(",") if methods else None)
            assert body == rendered, (f"{page_name(page)}: the block of {folder} is not what its "
                                      "JSON renders: python tools/benchmark.py --render-readme "
                                      "README.md docs/*.md")
    assert blocks >= 1, "docs/results.md shows measured results"


@pytest.mark.parametrize("method", METHODS)
def test_a_method_page_and_its_script_point_to_each_other(method):
    page = REPO / "docs" / f"{method}.md"
    module = importlib.import_module(method)
    assert page.exists(), f"docs/{method}.md is missing"
    assert f"docs/{method}.md" in module.__doc__, f"{method}.py's docstring does not name its page"
    text = page.read_text()
    assert f"](../{method}.py)" in text, f"docs/{method}.md does not link its script"

    # the page's map of the script: every name it gives exists, every section it names is one
    part = re.search(r"^## [^\n]*script[^\n]*\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert part, f"docs/{method}.md has no section about where things are in {method}.py"
    source = (REPO / f"{method}.py").read_text()
    sections = set(re.findall(r"^# -{20,} (\w+)$", source, flags=re.M))
    names = [n for n in re.findall(r"`([A-Za-z_][\w.]*)(?:\(\))?`", part.group(1))
             if not n.endswith(".py")]
    assert names, f"docs/{method}.md names nothing of {method}.py"
    missing = []
    for name in names:
        if name.startswith("common."):
            modname, _, attr = name.rpartition(".")
            try:
                ok = hasattr(importlib.import_module(modname), attr)
            except ImportError:
                ok = importlib.util.find_spec(name) is not None
        else:
            obj, ok = module, True
            for attr in name.split("."):
                ok = ok and hasattr(obj, attr)
                obj = getattr(obj, attr, None)
        if not ok:
            missing.append(name)
    named_sections = set(re.findall(r"(?<!\*)\*([a-z]+)\*(?!\*)", part.group(1)))
    assert not missing, f"docs/{method}.md names {missing}, which {method}.py does not define"
    assert named_sections <= sections, (f"docs/{method}.md names sections "
                                        f"{sorted(named_sections - sections)} of {method}.py")


def test_the_readme_stays_short():
    words = len((REPO / "README.md").read_text().split())
    assert words <= 2000, f"the README has {words} words; move details to a page in docs/"
