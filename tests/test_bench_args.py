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
    ("offload", ["--memory_gib", "16", "--memory_fraction", "0.2"], "--memory_fraction and --memory_gib both cap"),
    ("offload", ["--memory_gib", "0"], "--memory_gib 0.0: must be > 0"),
    ("offload", ["--method", "hizoo"], "--method hizoo: "),
])
def test_bad_flags_exit_with_a_clear_message(monkeypatch, capsys, script, argv, message):
    module = load_bench(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_offload_bench_tiled_weights_are_seeded_distinct_and_shaped_like_an_init():
    """bench/offload.py's tiled init (seconds for a 13B model where transformers' init takes minutes): matrices with
    std 0.02 that differ from each other, norms 1, biases 0, the head tied to the embeddings, the same values twice."""
    import torch
    offload = load_bench("offload")
    build = lambda: offload.build(offload.config_of("tiny"), torch.float32)   # noqa: E731
    model, again = build(), build()
    params = dict(model.named_parameters())
    matrices = [p for p in params.values() if p.dim() == 2]
    assert all(abs(p.std().item() - 0.02) < 0.004 for p in matrices)
    assert not torch.equal(params["model.decoder.layers.0.self_attn.k_proj.weight"],
                           params["model.decoder.layers.0.self_attn.v_proj.weight"])
    assert all(torch.all(p == (0 if n.endswith("bias") else 1)) for n, p in params.items() if p.dim() == 1)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
