"""Fixtures shared by several test files, and the test tiers.

Every test that starts ranks (``tests/dist_utils.py``'s ``run_distributed`` / ``run_train_steps``,
``torch.multiprocessing``, torchrun) is marked ``distributed``, and every test that launches a Python
interpreter of its own (``subprocess``) ``slow``, here, by reading the code the test runs: its function, the
fixtures it uses, and every function or class of ``tests`` those call, however deep. An explicit
``@pytest.mark.distributed`` / ``@pytest.mark.slow`` works too. ``bash scripts/test.sh --fast`` runs the rest
(``-m "not distributed and not slow"``); docs/testing.md has both tiers.

So that the fast tier stays fast, a test that is not marked ``distributed`` and still starts ranks fails,
naming itself (the rule above missed it: mark it explicitly).
"""

from __future__ import annotations

import dis
import importlib
import inspect
import os
import subprocess
import sys
import types

import pytest

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# names (and launcher modules named in a command line) whose use starts ranks: the spawn helpers of
# tests/dist_utils.py, torch.multiprocessing's, torchrun and accelerate launch
DISTRIBUTED_NAMES = frozenset(
    {
        "run_distributed",
        "run_train_steps",
        "start_processes",
        "spawn",
        "torchrun",
        "torch.distributed.run",
        "accelerate.commands.launch",
    }
)
# names whose use launches a Python interpreter of its own (seconds each: it imports torch afresh): a subprocess,
# a notebook's kernel
SUBPROCESS_NAMES = frozenset({"subprocess", "NotebookClient"})
MARKERS = {"distributed": DISTRIBUTED_NAMES, "slow": SUBPROCESS_NAMES}


@pytest.fixture(scope="session")
def sharded_runs(tmp_path_factory):
    """HDPTrainer runs under ZeRO stages 0-2 and FSDP2 on 4, 2 and 1 gloo ranks (tests/test_zero.py's
    ``train_all``), launched once for tests/test_zero.py and tests/test_fsdp.py together."""
    from tests.test_zero import train_all

    return train_all(tmp_path_factory.mktemp("sharded"))


# ----------------------------------------------------------------------------------------------------------- tiers
def _in_tests(obj) -> bool:
    path = getattr(inspect.getmodule(obj), "__file__", None) or ""
    return os.path.abspath(path).startswith(TESTS_DIR + os.sep)


def _code_names(code: types.CodeType) -> tuple[set[str], list[tuple[str, str]]]:
    """The names and string constants ``code`` and the code nested in it use, and the ``(module, name)`` pairs
    they import."""
    names = set(code.co_names) | {c for c in code.co_consts if isinstance(c, str) and len(c) < 64}
    imported = []
    module = None
    for ins in dis.get_instructions(code):
        if ins.opname == "IMPORT_NAME":
            module = ins.argval
        elif ins.opname == "IMPORT_FROM" and module:
            imported.append((module, ins.argval))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner, inner_imported = _code_names(const)
            names |= inner
            imported += inner_imported
    return names, imported


def _callees(func) -> tuple[set[str], list]:
    """The names ``func`` uses, and the functions and classes of ``tests`` it reaches by them."""
    code = getattr(func, "__code__", None)
    if code is None:
        return set(), []
    names, imported = _code_names(code)
    scope = getattr(func, "__globals__", {})
    found = [scope[n] for n in names if n in scope]
    for module_name, attr in imported:
        try:
            module = sys.modules.get(module_name) or importlib.import_module(module_name)
        except ImportError:
            continue
        found.append(getattr(module, attr, None))
    modules = [m for m in found if isinstance(m, types.ModuleType) and _in_tests(m)]
    found += [getattr(m, n) for m in modules for n in names if hasattr(m, n)]  # `dist_utils.run_distributed(...)`
    return names, [f for f in found if (inspect.isfunction(f) or inspect.isclass(f)) and _in_tests(f)]


def markers_of(func, memo: dict) -> frozenset[str]:
    """The tier markers ``func`` (a function or class of ``tests``) earns through the names it uses, itself or
    through what it calls."""
    key = id(func)
    if key in memo:
        return memo[key]
    memo[key] = frozenset()  # recursion guard
    parts = [func]
    if inspect.isclass(func):  # its own methods (not the ones it inherits from torch or transformers)
        parts = [m for _, m in inspect.getmembers(func, inspect.isfunction) if _in_tests(m)]
    marks: set[str] = set()
    for part in parts:
        names, callees = _callees(inspect.unwrap(part))
        marks |= {mark for mark, trigger in MARKERS.items() if names & trigger}
        for callee in callees:
            marks |= markers_of(callee, memo)
    memo[key] = frozenset(marks)
    return memo[key]


def _fixture_functions(item) -> list:
    """The functions of the fixtures ``item`` uses (directly or through other fixtures)."""
    info = getattr(item, "_fixtureinfo", None)  # pytest's; stable since pytest 3
    defs = getattr(info, "name2fixturedefs", {}) if info is not None else {}
    return [d.func for fixturedefs in defs.values() for d in fixturedefs if _in_tests(d.func)]


def pytest_collection_modifyitems(config, items):
    memo: dict = {}
    for item in items:
        func = getattr(item, "function", None)
        if func is None:
            continue
        marks = set(markers_of(func, memo))
        for fixture in _fixture_functions(item):
            marks |= markers_of(fixture, memo)
        for mark in sorted(marks - {m.name for m in item.iter_markers()}):
            item.add_marker(getattr(pytest.mark, mark))


# the guard: a test outside the distributed tier that starts ranks fails, naming itself
_UNMARKED: list = []


def _guard(what: str) -> None:
    if _UNMARKED:
        raise RuntimeError(
            f"{_UNMARKED[0].nodeid} starts ranks ({what}) but is not marked distributed: tests/conftest.py's rule "
            "did not see it. Mark the test @pytest.mark.distributed."
        )


def _guarded(fn, what: str):
    def wrapper(*args, **kwargs):
        _guard(what)
        return fn(*args, **kwargs)

    wrapper.__wrapped__ = fn
    return wrapper


_popen_init = subprocess.Popen.__init__


def _popen_guarded(self, args, *rest, **kwargs):
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else [str(args)]
    if any(a in DISTRIBUTED_NAMES or a.endswith("/torchrun") for a in argv):
        _guard(" ".join(argv[:4]))
    return _popen_init(self, args, *rest, **kwargs)


def pytest_configure(config):
    import torch.multiprocessing as mp

    for name in ("start_processes", "spawn"):
        setattr(mp, name, _guarded(getattr(mp, name), f"torch.multiprocessing.{name}"))
    subprocess.Popen.__init__ = _popen_guarded


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    unmarked = item.get_closest_marker("distributed") is None
    if unmarked:
        _UNMARKED.append(item)
    try:
        yield
    finally:
        if unmarked:
            _UNMARKED.remove(item)
