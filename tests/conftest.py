"""Fixtures shared by the tests."""
import pytest

from tests.helpers import SHARED_CIFAR10


@pytest.fixture
def cifar10_dir():
    if not (SHARED_CIFAR10 / "train").is_dir():
        pytest.skip(f"real CIFAR-10 JPEGs not found at {SHARED_CIFAR10}")
    return SHARED_CIFAR10
