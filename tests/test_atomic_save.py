"""Atomic checkpoints (:mod:`hf_hdp.trainer.saving`): a save that fails part-way publishes nothing.

On 2 gloo ranks (tests/test_zero.py's tiny Llama, float64, AdamW, 4 steps, a save every 2): a full disk on
rank 1 during the step-4 save (its checkpoint writer raises ``ENOSPC`` after writing part of a file) fails
on both ranks with an error naming the path and "no space left on device", leaves no ``checkpoint-4`` and
no temporary, and ``resume_from_checkpoint=True`` then resumes from ``checkpoint-2`` to the uninterrupted
run's weights. The same for rank 1 killed mid-write under FSDP: ``checkpoint-2`` stays the latest, the half-written
``tmp-checkpoint-4`` is invisible to Trainer, and the resumed run removes it. An asynchronous save
(``async_checkpoint``) publishes the same checkpoints.
"""

from __future__ import annotations

import errno
import os

import pytest

from tests.dist_utils import run_distributed
from tests.models import save_tiny_model
from tests.test_zero import _close, _train


def _config_with(**extra):
    from hf_hdp import HDPConfig

    def make(*args, **kwargs):
        return HDPConfig(*args, **{**kwargs, **extra})

    return make


def _fail_writes(step: int, how: str):
    """Make this rank's checkpoint writer fail part-way into the file of the save at ``step``."""
    import torch.distributed.checkpoint.filesystem as fs

    original = fs._write_item

    def failing(transforms, stream, *args, **kwargs):
        if f"tmp-checkpoint-{step}" in str(getattr(stream, "name", "")):
            stream.write(b"\0" * 4096)
            stream.flush()
            if how == "kill":
                os._exit(17)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(transforms, stream, *args, **kwargs)

    fs._write_item = failing
    return lambda: setattr(fs, "_write_item", original)


def _disk_full_worker(rank, world, model, base):
    from transformers.trainer_utils import get_last_checkpoint

    import tests.test_zero

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    tests.test_zero.HDPConfig = _config_with(p2p_timeout_s=60)
    full = _train(model, os.path.join(base, "full"), world, zero_stage=1)["weights"]
    run = os.path.join(base, "run")
    restore = _fail_writes(4, "enospc") if rank == 1 else (lambda: None)
    try:
        _train(model, run, world, zero_stage=1, save_steps=2)
        error = None
    except OSError as err:
        error = str(err)
    finally:
        restore()
    after_failure = {"latest": get_last_checkpoint(run), "listing": sorted(os.listdir(run))}
    resumed = _train(model, run, world, zero_stage=1, save_steps=2, resume=True)["weights"]
    tests.test_zero.HDPConfig = _config_with(p2p_timeout_s=60, async_checkpoint=True)
    async_run = os.path.join(base, "async")
    async_weights = _train(model, async_run, world, zero_stage=1, save_steps=2)["weights"]
    async_resumed = _train(
        model, async_run, world, zero_stage=2, save_steps=2, resume=os.path.join(async_run, "checkpoint-2")
    )["weights"]
    return {
        "full": full,
        "error": error,
        "after_failure": after_failure,
        "resumed": resumed,
        "listing": sorted(os.listdir(run)),
        "async": async_weights,
        "async_resumed": async_resumed,
        "async_listing": sorted(os.listdir(async_run)),
    }


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory):
    base = tmp_path_factory.mktemp("disk_full")
    model = save_tiny_model("llama", str(base / "model"))
    return base, run_distributed(_disk_full_worker, 2, model, str(base), timeout=900)


def test_a_full_disk_names_the_path_and_the_cause_on_every_rank(disk_full):
    base, results = disk_full
    for r, result in enumerate(results):
        error = result["error"]
        assert error is not None, r
        if r == 1:
            assert os.path.join(str(base), "run", "tmp-checkpoint-4") in error and "no space left on device" in error
            assert "checkpoint-2 stays the latest checkpoint" in error, error
        else:
            assert "another rank failed" in error or "no space left on device" in error, error


def test_a_failed_save_leaves_the_previous_checkpoint_latest_and_resumable(disk_full):
    base, results = disk_full
    for r, result in enumerate(results):
        after = result["after_failure"]
        assert after["latest"] == os.path.join(str(base), "run", "checkpoint-2"), after
        assert "checkpoint-4" not in after["listing"] and not any(n.startswith("tmp-") for n in after["listing"])
        _close(result["resumed"], result["full"], f"rank {r}, resumed after the failed save")
        assert "checkpoint-4" in result["listing"] and not any(n.startswith("tmp-") for n in result["listing"])


def test_an_asynchronous_save_publishes_resumable_checkpoints(disk_full):
    _, results = disk_full
    for r, result in enumerate(results):
        assert {"checkpoint-2", "checkpoint-4"} <= set(result["async_listing"]), result["async_listing"]
        assert not any(n.startswith("tmp-") for n in result["async_listing"])
        _close(result["async"], result["full"], f"rank {r}, async")
        _close(result["async_resumed"], result["full"], f"rank {r}, resumed from an async checkpoint")


def _killed_worker(rank, world, model, base, kill: bool):
    import tests.test_zero

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    tests.test_zero.HDPConfig = _config_with(p2p_timeout_s=30)
    run = os.path.join(base, "run")
    if kill:
        if rank == 1:
            _fail_writes(4, "kill")
        _train(model, run, world, fsdp="full_shard", save_steps=2)
        return None
    full = _train(model, os.path.join(base, "full"), world, fsdp="full_shard")["weights"]
    return full, _train(model, run, world, fsdp="full_shard", save_steps=2, resume=True)["weights"]


def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_latest_and_resumable(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    model = save_tiny_model("llama", str(tmp_path / "model"))
    with pytest.raises(RuntimeError) as failure:
        run_distributed(_killed_worker, 2, model, str(tmp_path), True, timeout=600)
    assert "exit code 17" in str(failure.value)  # rank 1 died mid-write (the launcher then stops rank 0)
    run = tmp_path / "run"
    assert get_last_checkpoint(str(run)) == str(run / "checkpoint-2")
    assert (run / "tmp-checkpoint-4").is_dir() and not (run / "checkpoint-4").exists()
    results = run_distributed(_killed_worker, 2, model, str(tmp_path), False, timeout=600)
    for r, (full, resumed) in enumerate(results):
        _close(resumed, full, f"rank {r}, resumed after the kill")
    assert (run / "checkpoint-4").is_dir() and not (run / "tmp-checkpoint-4").exists()


def test_write_failures_of_a_full_disk_name_the_path_and_the_cause():
    from hf_hdp.engine.state import CheckpointWriteError, write_error

    cases = [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 306304 vs 306196"),
        OSError(errno.EFBIG, "File too large"),
    ]
    for err in cases:
        translated = write_error(err, "/out/tmp-checkpoint-4", 1, 4, "/out/checkpoint-2")
        assert isinstance(translated, CheckpointWriteError) and translated.errno == errno.ENOSPC
        text = str(translated)
        assert "rank 1" in text and "/out/tmp-checkpoint-4" in text and "global step 4" in text, text
        assert "no space left on device" in text and "/out/checkpoint-2 stays the latest checkpoint" in text, text
    assert write_error(ValueError("a bug"), "/out", 0, 4, None) is None  # anything else passes unchanged


def test_state_dict_type_is_honoured_or_refused_by_name():
    from types import SimpleNamespace

    from hf_hdp.engine.fsdp import state_dict_type

    assert state_dict_type(SimpleNamespace(fsdp_config={})) == "SHARDED_STATE_DICT"  # the default
    assert state_dict_type(SimpleNamespace(fsdp_config={"state_dict_type": "FULL_STATE_DICT"})) == "FULL_STATE_DICT"
    with pytest.raises(ValueError, match=r"state_dict_type'\] = 'LOCAL_STATE_DICT'.*SHARDED_STATE_DICT"):
        state_dict_type(SimpleNamespace(fsdp_config={"state_dict_type": "LOCAL_STATE_DICT"}))


def test_files_are_split_by_size_in_order():
    from hf_hdp.engine.export import file_names, parse_size, plan_files

    assert plan_files([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
    assert file_names(1) == ["model.safetensors"] and file_names(2)[1] == "model-00002-of-00002.safetensors"
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1MiB") == 2**20 and parse_size(5) == 5
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("big")
