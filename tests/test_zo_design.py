"""The design of the ZO core, checked: a new method is one small class whose rule runs through the fast CPU path
unchanged; the modules import one way; the backends know no optimizer; the traced form keeps only what is needed."""
import ast
import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import zo
import zo_cpu
import zo_methods
import zo_noise
import zo_rule
from conftest import ROOT
from zo_adamu import ZOAdaMU
from zo_family import MeZO

CORE = ["zo_noise.py", "zo_rule.py", "zo_cpu.py", "zo_triton.py", "zo.py"]
METHODS = ["zo_adamu.py", "zo_family.py", "zo_lowrank.py"]
BACKENDS = ["zo_noise.py", "zo_rule.py", "zo_cpu.py", "zo_cpu_prelude.c", "zo_triton.py"]


# ------------------------------------------------------------------------------- a new method in a test file
class ZOSignSGD(zo.ZOOptimizer):
    """ZO-SGD with sign updates: u = z, θ <- θ - lr·sign(g)·sign(z) (+ decay)."""
    name, title = "zo_sgd_sign_test", "ZO-SGD-Sign (test)"
    streams = ("z",)
    update_values = ("neg_lr_sign_g",)

    def __init__(self, params, lr=1e-3, **kw):
        super().__init__(params, lr, **kw)

    @staticmethod
    def rule(noise, state, s):
        return zo.Rule(direction=noise.z, step=zo_rule.sign(noise.z) * s.neg_lr_sign_g)

    def values_from_g(self, g, group):
        return {"neg_lr_sign_g": -group["lr"] * torch.sign(g)}


def _sign_run(fast, dtype=torch.float32, steps=4, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 20), nn.LayerNorm(20), nn.Linear(20, 2)).to(dtype)
    x, y = torch.randn(16, 6, dtype=dtype), torch.randn(16, 2, dtype=dtype)
    opt = ZOSignSGD(zo.param_groups_for_model(model, 0.2), lr=1e-2, eps=1e-2, noise_block=32, **kw)
    opt.fast_paths = fast
    losses = []
    for t in range(steps):
        loss = (lambda: torch.tensor(float("nan"))) if t == 1 else (lambda: ((model(x) - y) ** 2).mean())
        losses.append(float(opt.step(loss)))
    return model, opt, losses


@pytest.mark.skipif(not zo.kernels_available(), reason="no C compiler: only the torch path exists")
@pytest.mark.parametrize("kw", [{}, dict(exact_restore=True), dict(keep_direction=True, chunk_numel=64),
                                dict(direction="rademacher")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_method_defined_in_a_test_runs_the_c_path_bit_for_bit(kw, dtype):
    kernels = zo_cpu.kernels_for(ZOSignSGD.rule, ZOSignSGD.streams, (), ZOSignSGD.update_values)
    calls = kernels.calls
    fast_model, fast, _ = _sign_run(True, dtype, **kw)
    assert kernels.calls > calls, "the C kernels did not run"
    assert any(b["library"].startswith(ZOSignSGD.rule.__qualname__) for b in zo.kernel_builds())
    ref_model, ref, _ = _sign_run(False, dtype, **kw)
    assert fast.noise_calls == ref.noise_calls and int(fast.skipped_steps) == int(ref.skipped_steps) == 1
    start = _sign_run(False, dtype, steps=0)[0]
    for (name, a), b, c in zip(fast_model.named_parameters(), ref_model.parameters(), start.parameters()):
        assert torch.equal(a, b), name
        assert not torch.equal(a, c), name


def test_the_sign_method_is_the_textbook_algorithm():
    """float64: after each step θ moved by exactly -lr·sign(g)·sign(z) - lr·λ·θ (λ on the decay group only)."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    groups = zo.param_groups_for_model(model, 0.5)
    opt = ZOSignSGD(groups, lr=1e-2, eps=1e-3, exact_restore=True)
    params = [p for gr in groups for p in gr["params"]]
    for t in range(3):
        before = [p.detach().clone() for p in params]
        opt.step(lambda: ((model(x) - y) ** 2).mean())
        g = float(opt.last_projected_grad)
        for i, (p, b) in enumerate(zip(params, before)):
            z = zo_noise.sample_direction(zo_noise.step_seed(0, t), i, p.numel()).view_as(p).double()
            lam = 0.5 if p is model.weight else 0.0
            want = b * (1 - 1e-2 * lam) - 1e-2 * math.copysign(1.0, g) * torch.sign(z)
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------- the design rules
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_top_level_modules_import_without_cycles():
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    graph = {m: _imports(p) & set(modules) - {m} for m, p in modules.items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path + [m])}")
        if state.get(m) != "done":
            state[m] = "open"
            for dep in sorted(graph[m]):
                visit(dep, path + [m])
            state[m] = "done"
    for m in sorted(graph):
        visit(m, [])
    # the chain zo_noise <- zo_rule <- {zo_cpu, zo_triton} <- zo <- the methods <- zo_methods (the registry)
    assert graph["zo_noise"] == set() and graph["zo_rule"] == set()
    assert graph["zo_cpu"] <= {"zo_noise", "zo_rule"} and graph["zo_triton"] <= {"zo_noise", "zo_rule"}
    assert "zo" not in graph["zo_cpu"] | graph["zo_triton"]
    methods = {m[:-3] for m in METHODS}
    assert not graph["zo"] & (methods | {"zo_methods"}), "the core imports no method"
    assert methods <= graph["zo_methods"] and "zo_methods" not in set().union(*(graph[m] for m in methods))
    users = {m for m, deps in graph.items() if deps & methods} - methods - {"zo_methods"}
    assert not users, f"{sorted(users)} import a method module: read the registry, zo_methods"


def test_backends_name_no_optimizer():
    names = {ZOSignSGD.__name__, ZOSignSGD.name, ZOSignSGD.title}
    for cls in zo_methods.OPTIMIZERS.values():
        names |= {cls.__name__, cls.name, cls.title}
    for file in BACKENDS:
        text = (ROOT / file).read_text()
        found = sorted(n for n in names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text))
        assert not found, f"{file} names optimizers {found}"


def test_no_top_level_module_is_longer_than_about_800_lines():
    for path in ROOT.glob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 820, f"{path.name} has {lines} lines"


def test_tests_of_the_core_use_public_names_only():
    private = re.compile(r"\b(?:zo|zo_noise|zo_rule|zo_cpu|zo_triton|kernels|opt|optimizer|fused|reference|"
                         r"graphed|eager|ref|got|keep)\._[a-z]\w*")
    for path in sorted((ROOT / "tests").glob("test_zo*.py")):
        hits = [line.strip() for line in path.read_text().splitlines() if private.search(line)]
        assert not hits, f"{path.name} reaches into private names: {hits}"


def test_registry_and_declarations():
    assert list(zo_methods.OPTIMIZERS) == ["mezo", "zo_adamu", "zo_sgd_sign", "zo_sgd_mmt", "zo_sgd_cons", "zo_adam",
                                           "hizoo", "lozo", "lozo_m", "subzero", "fzoo"]
    assert all(name == cls.name for name, cls in zo_methods.OPTIMIZERS.items())
    forwards = {name: cls.forwards for name, cls in zo_methods.OPTIMIZERS.items()}
    assert forwards == {**{n: 2 for n in forwards}, "zo_sgd_cons": 5, "hizoo": 3, "fzoo": 9}
    assert MeZO.memory() == "MeZO: no memory beyond the model (inference memory)"
    assert ZOAdaMU.memory() == ("ZO-AdaMU: +1 x trainable params (momentum, in --zo_state_dtype, default the "
                                   "parameter dtype)")


# ------------------------------------------------------------------------------- the traced form
def test_traces_keep_only_what_an_output_needs():
    scalars = ZOAdaMU.step_values + ZOAdaMU.update_values
    graph, out, _ = zo_rule.trace("perturb", ZOAdaMU.rule, ZOAdaMU.streams, ZOAdaMU.buffers, scalars)
    ops = [graph.nodes[n][0] for n in graph.order(out.values())]
    assert "sqrt" not in ops and "div" not in ops and list(out) == ["x"]   # a probe needs u, not the step
    graph, out, _ = zo_rule.trace("update", ZOAdaMU.rule, ZOAdaMU.streams, ZOAdaMU.buffers, scalars)
    ops = [graph.nodes[n][0] for n in graph.order(out.values())]
    assert ops.count("sqrt") == 1 and sorted(out) == ["momentum", "x"]
    # hash-consing: u (used by the step, the new state and the restore) is one node
    assert ops.count("mul") == len([n for n in graph.order(out.values()) if graph.nodes[n][0] == "mul"])
    assert len(set(graph.nodes)) == len(graph.nodes)


def test_rule_errors_name_the_fix():
    def branching(noise, state, s):
        return zo.Rule(direction=noise.z if noise.z > 0 else -noise.z, step=noise.z)
    with pytest.raises(TypeError, match="use where"):
        zo_rule.trace("perturb", branching, ("z",), (), ())

    def unknown(noise, state, s):
        return zo.Rule(direction=noise.z * s.beta, step=noise.z)
    with pytest.raises(AttributeError, match="no 'beta'; declared: "):
        zo_rule.trace("perturb", unknown, ("z",), (), ("coef",))


# ------------------------------------------------------------------------------- shards (issue 16 is not precluded)
class Shifted(MeZO):
    """MeZO whose tensors are the slice [offset, offset + numel) of a longer flattened tensor."""
    offset = 0

    def noise_offset(self, p):
        return self.offset


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("offset", [0, 1, 37])
def test_a_shard_draws_its_slice_of_the_full_tensors_noise(fast, offset):
    full = torch.zeros(200)
    opt = MeZO([nn.Parameter(full.clone())], lr=0.0, eps=1.0, noise_block=16)
    shard = nn.Parameter(torch.zeros(100))
    sharded = Shifted([shard], lr=0.0, eps=1.0, noise_block=16, chunk_numel=32)
    sharded.offset = offset
    sharded.fast_paths = fast
    seen = []
    sharded.probe(lambda: seen.append(shard.detach().clone()) or torch.tensor(0.0))
    whole = zo_noise.sample_direction(zo_noise.step_seed(0, 0), 0, 200)
    assert torch.equal(seen[0], whole[offset:offset + 100])
    del opt


# ------------------------------------------------------------------------------- CUDA graph bookkeeping (no GPU)
class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph: counts replays; capture runs the sweep once (as recording would)."""
    def __init__(self):
        self.replayed = 0

    def replay(self):
        self.replayed += 1


def test_captured_sweeps_are_run_once_captured_once_and_dropped_with_the_layout(monkeypatch):
    """Each sweep key runs eagerly once, is captured the second time and replayed after; a new layout (tensors
    moved, frozen, state replaced) drops every captured graph, which holds raw pointers."""
    import contextlib
    import zo_triton
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    sweeps = zo_triton.DeviceSweeps("cpu", ZOSignSGD.rule, ("z",), (), (), ("neg_lr_sign_g",), tensors=1, groups=1)
    tensor = torch.zeros(3)
    captured = []

    def capture():
        captured.append(1)
        return 7   # what the capture counted (noise draws)
    assert sweeps.replay("perturb", "layout A", capture, [tensor]) is None and not captured   # eager, once
    assert sweeps.replay("perturb", "layout A", capture, [tensor]) == 7 and len(captured) == 1  # captured, replayed
    assert sweeps.replay("perturb", "layout A", capture, [tensor]) == 7 and len(captured) == 1  # replayed
    graph = sweeps.graphs["perturb"][0]
    assert graph.replayed == 2 and tensor._version == 2   # autograd is told the tensors changed
    assert sweeps.replay("perturb", "layout B", capture, [tensor]) is None and list(sweeps.graphs) == ["perturb"]
    assert sweeps.graphs["perturb"] == "seen"   # the old capture was dropped: this one starts over
