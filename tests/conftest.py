"""Fixtures shared by the test files."""
import pytest

from common import small_folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """20 train and 10 test images per class of the shipped sample (200 / 100): for the training-script runs
    that check plumbing, where the full 2,000-image sample would only cost time."""
    return small_folder(tmp_path_factory.mktemp("tiny_data"), train_per_class=20, test_per_class=10)
