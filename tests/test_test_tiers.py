"""tests/conftest.py's test tiers: which tests it marks ``distributed`` / ``slow``, and the guard that fails a test
outside the distributed tier that starts ranks anyway."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from tests import dist_utils, test_zero
from tests.conftest import markers_of
from tests.dist_utils import run_distributed

# read at import, so that the test reading them is not itself marked for the names it mentions
LAUNCHERS = {"train_all": test_zero.train_all, "run_train_steps": dist_utils.run_train_steps}


def _rank_sum(rank, world_size):
    return rank


def _spawns_two():
    return run_distributed(_rank_sum, 2)


def _spawns_through_a_helper():
    return _spawns_two()


class _Launcher:
    def go(self):
        return _spawns_through_a_helper()


def _runs_torchrun():
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "x.py"]


def _lazy_import_spawn():
    from tests.test_test_tiers import _spawns_two

    return _spawns_two()


def _launches_an_interpreter():
    return subprocess.run([sys.executable, "-c", "pass"], check=True)


def _plain(x):
    return sorted(x)


def _recursive(n):
    return _recursive(n - 1) if n else _plain([n])


@pytest.mark.parametrize(
    "func, expected",
    [
        (_spawns_two, {"distributed"}),
        (_spawns_through_a_helper, {"distributed"}),
        (_Launcher, {"distributed"}),
        (_runs_torchrun, {"distributed"}),
        (_lazy_import_spawn, {"distributed"}),
        (_launches_an_interpreter, {"slow"}),
        (_plain, set()),
        (_recursive, set()),
    ],
)
def test_markers_follow_the_code_a_test_runs(func, expected):
    assert markers_of(func, {}) == expected


def test_the_spawning_helpers_are_in_the_distributed_tier():
    assert markers_of(LAUNCHERS["train_all"], {}) == {"distributed"}  # the sharded_runs fixture's launcher
    assert markers_of(LAUNCHERS["run_train_steps"], {}) == {"distributed", "slow"}  # torchrun, through subprocess


def test_a_test_outside_the_distributed_tier_that_starts_ranks_fails():
    # names the rule cannot read (Python folds "a" + "b" into one constant, so they are joined at run time)
    hidden = importlib.import_module(".".join(["tests", "dist_utils"]))
    with pytest.raises(
        RuntimeError,
        match="test_a_test_outside_the_distributed_tier_that_starts_ranks_fails starts ranks .* not marked distributed",
    ):
        getattr(hidden, "_".join(["run", "distributed"]))(_rank_sum, 2)
    with pytest.raises(RuntimeError, match="not marked distributed"):
        subprocess.run([sys.executable, "-m", ".".join(["torch", "distributed", "run"]), "--help"], capture_output=True)
