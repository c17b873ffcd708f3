"""Fixtures shared by the tests, and the two tiers.

`python -m pytest` runs the default tier: every loss against its reference, every script end to
end on tiny settings, resume, bad input, the docs; a few minutes on 2 cores. `python -m pytest
--full` (what CI runs) adds the tests marked `full`: several processes (torchrun, Slurm), the real
CIFAR-10 images (every test that takes the `cifar10_dir` fixture), the input pipelines, the
benchmark tool and the heavier runs. `-m slow` selects opt-in measurements outside both.
"""
import shutil
import signal

import pytest

from tests.helpers import SHARED_CIFAR10


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", default=False,
                     help="the full suite: also the tests marked `full` (CI runs it)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "cifar10_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.full)  # real images: the full suite
    if config.getoption("--full"):
        return
    full = [item for item in items if item.get_closest_marker("full")]
    if full:
        config.hook.pytest_deselected(items=full)
        items[:] = [item for item in items if not item.get_closest_marker("full")]


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A script's main() run in-process installs its stop handlers (Ctrl-C's among them): put
    back the ones before, so that Ctrl-C still stops pytest."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
    handlers = {s: signal.getsignal(s) for s in signals}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


@pytest.fixture
def cifar10_dir():
    if not (SHARED_CIFAR10 / "train").is_dir():
        pytest.skip(f"real CIFAR-10 JPEGs not found at {SHARED_CIFAR10}")
    return SHARED_CIFAR10


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """`module_tmp(name)`: a folder for runs that one module's tests share. A run directory weighs
    up to a few hundred MB (checkpoints), so these go when their module ends, unless one of its
    tests failed; a passed test's own `tmp_path` goes when it ends (pytest.ini's
    tmp_path_retention_policy). That keeps the suite's disk use to a few GB at any time."""
    made, failed_before = [], request.session.testsfailed

    def mktemp(name):
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
