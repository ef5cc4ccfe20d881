"""One clear error, once (:func:`hf_hdp.distributed.launch.install_error_hook`): a refusal under torchrun ends
the console with ``hf_hdp: <Error>: <message>`` once, in torchrun's summary, without the ranks' tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.dist_utils import ROOT, free_port

REFUSING_SCRIPT = """
import sys
from hf_hdp.distributed.launch import init_process_group
from hf_hdp.collators.documents import check_sample

init_process_group()
if sys.argv[1] == "refusal":
    check_sample(3, {"input_ids": [1, 2, "x"]})  # every rank refuses the same bad row
raise RuntimeError("a bug, not a refusal")
"""
MESSAGE = "hf_hdp: HDPDataError: sample 3: `input_ids` must hold integer token ids, found 'x' (str) at position 2."


def _torchrun(tmp_path, what: str, **env) -> subprocess.CompletedProcess:
    script = tmp_path / "refuse.py"
    script.write_text(REFUSING_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="", **env)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(script),
        what,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_a_refusal_under_torchrun_ends_the_console_with_its_message_once(tmp_path):
    proc = _torchrun(tmp_path, "refusal")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert output.count(MESSAGE) == 1, output  # not once per rank
    assert "check_sample" not in output and "documents.py" not in output, output  # no rank's traceback
    last = [line for line in output.splitlines() if line.strip()][-3:]
    assert any(MESSAGE in line for line in last), last  # torchrun's summary, the last thing printed, shows it


def test_other_errors_keep_their_tracebacks_and_hf_hdp_traceback_shows_a_refusals(tmp_path):
    proc = _torchrun(tmp_path, "bug")
    assert proc.returncode != 0 and proc.stderr.count("RuntimeError: a bug, not a refusal") >= 2, proc.stderr
    assert "Traceback" in proc.stderr and "hf_hdp: RuntimeError" not in proc.stderr
    proc = _torchrun(tmp_path, "refusal", HF_HDP_TRACEBACK="1")
    assert proc.returncode != 0 and "check_sample" in proc.stderr and MESSAGE in proc.stderr


def test_which_errors_are_refusals():
    from hf_hdp.collators.documents import HDPDataError, check_sample
    from hf_hdp.distributed import PeerCrashedError
    from hf_hdp.distributed.launch import is_refusal, refusal_text

    try:
        check_sample(0, {"input_ids": None})
    except HDPDataError as err:
        assert is_refusal(err) and refusal_text(err).startswith("hf_hdp: HDPDataError: sample 0")
    try:
        int("x")  # a ValueError raised outside hf_hdp
    except ValueError as err:
        assert not is_refusal(err)
    assert not is_refusal(PeerCrashedError("rank 0's peer rank 1 closed the connection"))
    assert not is_refusal(KeyboardInterrupt())
