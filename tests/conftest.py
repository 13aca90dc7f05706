import os
import sys

import pytest

from distdeer.sweep import SweepError, cpu_shares

sys.path.insert(0, os.path.dirname(__file__))

# The suite runs as `pytest -n 2` (README) with pyproject's `--dist loadfile --no-loadscope-reorder`: each
# file goes whole to one worker, in collection order.  Starting the longest files first keeps both workers
# busy to the end (longest-first scheduling).  Each file's seconds under `-n 2` on a 2-core VM (2026-12-06,
# from the run's JUnit report); only their order matters.
SECONDS = {"test_ray.py": 440, "test_train.py": 314, "test_multidevice.py": 199, "test_local_launch.py": 136,
           "test_scaling.py": 100, "test_deer.py": 98, "test_lru.py": 97, "test_cluster_walkthrough.py": 85,
           "test_multiprocess.py": 42, "test_scan.py": 43, "test_custom_model.py": 28}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -SECONDS.get(os.path.basename(str(item.fspath)), 0))  # stable: order kept in a file


@pytest.fixture
def two_cpus():
    """Tests that run two pinned processes side by side need the sweep's two CPU shares: on fewer CPUs
    the sweep (rightly) refuses ``--parallel 2``, and the failure should name the machine, not the sweep."""
    try:
        cpu_shares(2)
    except SweepError as e:
        pytest.fail(f"this test needs 2 CPUs: {e} (README: the suite needs the cores)", pytrace=False)
