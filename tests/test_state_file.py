"""A broken hdp_state.json is refused with an error naming the file and the fault, never a bare JSON/KeyError."""

from __future__ import annotations

import json

import pytest

from hf_hdp.trainer.checkpoint import (
    STATE_FORMAT,
    STATE_KEYS,
    HDPStateFileError,
    ResumeMismatchError,
    load_state,
)


def good_state(version: int = STATE_FORMAT) -> dict:
    state = {
        "format": version,
        "global_batch_size": 8,
        "seed": 42,
        "num_samples": 100,
        "lengths_sha256": "0123456789abcdef",
        "content_sha256": "fedcba9876543210" * 4,
        "drop_last": False,
        "planner": "balanced",
        "tokens_per_rank": 64,
        "world_size": 2,
        "global_step": 3,
        "hdp_config": {"tokens_per_rank": 64, "planner": "balanced"},
    }
    if version == 1:
        del state["content_sha256"]
    return state


def write(tmp_path, content) -> str:
    path = tmp_path / "hdp_state.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def refused(path: str, *fragments: str) -> str:
    with pytest.raises(HDPStateFileError) as info:
        load_state(path)
    message = str(info.value)
    assert path in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_the_table_covers_every_key_the_trainer_writes():
    assert set(good_state()) == set(STATE_KEYS)
    assert issubclass(HDPStateFileError, ResumeMismatchError) and issubclass(HDPStateFileError, ValueError)


def test_a_good_file_loads_as_written(tmp_path):
    state = good_state()
    assert load_state(write(tmp_path, state)) == state


def test_a_format_1_file_loads_with_content_sha256_unknown(tmp_path):
    loaded = load_state(write(tmp_path, good_state(1)))
    assert loaded["content_sha256"] is None
    assert loaded["lengths_sha256"] == "0123456789abcdef" and loaded["format"] == 1


def test_an_empty_file_is_refused(tmp_path):
    refused(write(tmp_path, ""), "is empty")
    refused(write(tmp_path, "  \n"), "is empty")


def test_a_file_that_is_not_json_is_refused_with_the_parse_error(tmp_path):
    message = refused(write(tmp_path, '{"format": 2, "seed": '), "is not JSON", "line 1")
    assert "Expecting value" in message
    refused(write(tmp_path, b"\xff\xfe\x00garbage"), "is not JSON", "UTF-8")


@pytest.mark.parametrize(
    "content, kind", [([1, 2], "a list"), ("3", "an integer"), ("null", "null"), ('"text"', "a string")]
)
def test_json_that_is_not_an_object_is_refused(tmp_path, content, kind):
    refused(write(tmp_path, content if isinstance(content, str) else json.dumps(content)), "is not a JSON object", kind)


@pytest.mark.parametrize("key", [k for k in STATE_KEYS if k != "format"])
def test_each_missing_key_is_named(tmp_path, key):
    state = good_state()
    del state[key]
    refused(write(tmp_path, state), f"has no key '{key}'")


def test_a_missing_format_is_named(tmp_path):
    state = good_state()
    del state["format"]
    refused(write(tmp_path, state), "has no key 'format'")


@pytest.mark.parametrize(
    "key, value, kind",
    [
        ("num_samples", "100", "a string"),
        ("global_batch_size", 8.5, "a number"),
        ("seed", None, "null"),
        ("drop_last", 0, "an integer"),
        ("tokens_per_rank", True, "a boolean"),  # JSON true is not an integer
        ("lengths_sha256", 12, "an integer"),
        ("content_sha256", ["ab"], "a list"),
        ("hdp_config", "balanced", "a string"),
        ("planner", {"name": "balanced"}, "a JSON object"),
    ],
)
def test_a_key_of_the_wrong_type_is_named_with_both_types(tmp_path, key, value, kind):
    state = good_state()
    state[key] = value
    expected = {int: "an integer", str: "a string", bool: "a boolean", dict: "a JSON object"}[STATE_KEYS[key][0]]
    refused(write(tmp_path, state), f"has {key}=", kind, f"it must be {expected}")


def test_a_newer_format_asks_for_an_upgrade(tmp_path):
    state = good_state()
    state["format"] = STATE_FORMAT + 1
    refused(write(tmp_path, state), f"format {STATE_FORMAT + 1}", "written by a newer hf_hdp", "upgrade")


@pytest.mark.parametrize("version", [0, -1, "2", 1.5, True])
def test_a_format_that_is_no_format_number_is_refused(tmp_path, version):
    state = good_state()
    state["format"] = version
    refused(write(tmp_path, state), "not a format number")


def test_an_unreadable_path_is_refused(tmp_path):
    folder = tmp_path / "hdp_state.json"
    folder.mkdir()  # a folder where the file should be
    refused(str(folder), "cannot be read")


def test_a_huge_wrong_value_is_shortened(tmp_path):
    state = good_state()
    state["hdp_config"] = list(range(10_000))
    message = refused(write(tmp_path, state), "has hdp_config=", "...")
    assert len(message) < 600


def test_what_the_json_parser_itself_refuses_is_named(tmp_path):
    """An integer of 5000 digits (past Python's str/int limit) and arrays nested 100,000 deep are the file's fault,
    named as such, not a bare ValueError or RecursionError."""
    huge = json.dumps(good_state())[:-1] + ', "extra": ' + "9" * 5000 + "}"
    refused(write(tmp_path, huge), "is not JSON hf_hdp can read", "ValueError")
    deep = '{"format": 2, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    refused(write(tmp_path, deep), "is not JSON hf_hdp can read", "RecursionError")


@pytest.mark.parametrize(
    "key, value",
    [
        ("global_batch_size", -4),
        ("global_batch_size", 10**300),
        ("global_batch_size", 0),
        ("world_size", 0),
        ("num_samples", -1),
        ("tokens_per_rank", 2**63),
        ("global_step", -1),
        ("seed", 2**64),
    ],
)
def test_integers_outside_their_range_are_refused(tmp_path, key, value):
    state = good_state()
    state[key] = value
    refused(write(tmp_path, state), f"has {key}=", "outside its valid range")
