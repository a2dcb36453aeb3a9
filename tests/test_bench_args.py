"""Benchmark scripts refuse bad flags before loading anything, naming the value and the fix."""

import importlib.util
import sys

import pytest

from conftest import ROOT


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script, argv, message", [
    ("learn", ["--method", "mezo", "--steps", "100", "--stop_at", "200"], "--stop_at 200 must lie between 1 and"),
    ("learn", ["--method", "mezo", "--stop_at", "0"], "--stop_at 0 must lie between 1 and --steps (1000)"),
    ("learn", ["--save_every", "0"], "--save_every 0 must be at least 1"),
    ("learn", ["--resume_from", "/nonexistent/checkpoint-250"], "is not a checkpoint folder"),
    ("zo_sweep", ["--shapes", "512-4"], "give PAIRSxWARPS pairs"),
    ("zo_sweep", ["--shapes", "512x0"], "pairs of positive ints"),
    ("scale", ["--procs", "1,x"], "--procs '1,x': give comma-separated process counts"),
    ("scale", ["--procs", "0,2"], "--procs '0,2': process counts must be >= 1"),
    ("scale", ["--modes", "dp,tp"], "--modes 'dp,tp': choose from dp, fsdp"),
    ("zo_step", ["--dtype", "float32,float8"], "--dtype 'float32,float8': choose one or more (comma-separated) of"),
    ("zo_step", ["--probe_modes", "inplace,sideways"], "--probe_modes 'inplace,sideways': choose all, or from"),
])
def test_bad_flags_exit_with_a_clear_message(monkeypatch, capsys, script, argv, message):
    module = load_bench(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
