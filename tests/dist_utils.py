"""Run a function on several CPU processes joined by a gloo process group, and collect results."""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port that was free a moment ago (for torchrun's --master_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, fn, args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:  # report every rank's failure to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo processes; return each rank's result.

    ``fn`` must be importable (defined at module level). A failure on any rank raises with its traceback.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.start_processes(
            _worker, args=(world_size, init_file, tmp, fn, args), nprocs=world_size, join=False, start_method="spawn"
        )
        errors = []
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    for proc in ctx.processes:
                        proc.kill()
                    errors.append(f"timed out after {timeout:.0f} s (a hang)")
                    break
        except Exception as err:  # a rank failed: show its own traceback, not just the exit code
            errors.append(str(err))
        results = []
        for r in range(world_size):
            path = os.path.join(tmp, f"rank{r}.pt")
            if not os.path.exists(path):
                results.append(None)
                continue
            data = torch.load(path, weights_only=False)
            if not data["ok"]:
                errors.append(f"rank {r}:\n{data['error']}")
            results.append(data.get("result"))
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return results


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = os.path.join(ROOT, "tests", "scripts", "train_steps.py")


def run_train_steps(nproc: int, model: str, out: str, *extra: str, restarts: int = 0, env: dict | None = None) -> dict:
    """Run ``tests/scripts/train_steps.py`` on ``nproc`` processes (torchrun; plain python for 1 without
    restarts) and return its ``log.json`` with the final ``weights`` and the ``wall`` seconds."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **(env or {}))
    if nproc == 1 and not restarts:
        cmd = [sys.executable, TRAIN_STEPS]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
        ]
        if restarts:
            cmd += ["--max-restarts", str(restarts)]
        cmd.append(TRAIN_STEPS)
    cmd += ["--model", model, "--out", out, *extra]
    started = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(os.path.join(out, "log.json")) as f:
        log = json.load(f)
    log["weights"] = torch.load(os.path.join(out, "weights.pt"))
    log["wall"] = time.time() - started
    return log
