"""The design of the ZO package, checked: a new method, stateless or stateful, is one small class whose rule runs
through the fast CPU path and the Triton kernels unchanged; the modules import one way (registry -> methods -> core ->
sweeps -> backends -> rule, noise); the backends know no optimizer; no method reaches into the core's private members;
no module in zo/ is over 600 lines; the traced form keeps only what is needed and computes a repeated operation once."""
import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import zo
from conftest import ROOT
from zo import noise as zo_noise
from zo import registry as zo_methods
from zo import rule as zo_rule
from zo.backends import cpu as zo_cpu
from zo.methods.adamu import ZOAdaMU
from zo.methods.family import MeZO

PACKAGE = ROOT / "zo"
BACKENDS = ["zo/noise.py", "zo/rule.py", "zo/sweeps.py", "zo/backends/cpu.py", "zo/backends/cpu_prelude.c",
            "zo/backends/triton.py"]


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
    kernels = zo_cpu.kernels_for(ZOSignSGD.sweep_spec())
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


# ------------------------------------------------------------------------------- a stateful method in a test file
class HeavyBall(zo.ZOOptimizer):
    """ZO-SGD with heavy-ball momentum: u = z, m <- β·m - lr·g·z, θ <- θ·decay + m (one buffer, one step value)."""
    name, title = "heavy_ball_test", "Heavy ball (test)"
    streams, buffers = ("z",), ("m",)
    step_values, update_values = ("beta",), ("neg_lr_g",)

    def __init__(self, params, lr=1e-2, **kw):
        super().__init__(params, lr, **kw)

    @staticmethod
    def rule(noise, state, s):
        m = state.m * s.beta + noise.z * s.neg_lr_g
        return zo.Rule(direction=noise.z, step=m, state={"m": m})

    def values_at(self, t):
        return {"beta": 0.9 if t else 0.0}

    def values_from_g(self, g, group):
        return {"neg_lr_g": -group["lr"] * g}


def heavy_ball_runs(dtype=torch.float32, **kw) -> dict:
    """Four steps (the second skipped for a non-finite loss) on the fast paths and on the torch path: weights and
    momentum of each, and whether they are equal bit for bit."""
    out = {}
    for fast in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 20), nn.LayerNorm(20), nn.Linear(20, 2)).to(dtype)
        x, y = torch.randn(16, 6, dtype=dtype), torch.randn(16, 2, dtype=dtype)
        opt = HeavyBall(zo.param_groups_for_model(model, 0.1), eps=1e-2, noise_block=32, **kw)
        opt.fast_paths = fast
        for t in range(4):
            opt.step((lambda: torch.tensor(float("nan"))) if t == 1 else (lambda: ((model(x) - y) ** 2).mean()))
        assert int(opt.skipped_steps) == 1
        out[fast] = [p.detach().clone() for p in model.parameters()] + [s["m"].clone() for s in opt.state.values()]
    return {"equal": all(torch.equal(a, b) for a, b in zip(out[True], out[False])) and len(out[True]) == 12,
            "moved": all(bool(a.ne(0).any()) for a in out[True][6:])}


@pytest.mark.skipif(not zo.kernels_available(), reason="no C compiler: only the torch path exists")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_stateful_method_in_a_test_runs_the_c_path_bit_for_bit(dtype):
    calls = zo_cpu.kernels_for(HeavyBall.sweep_spec()).calls
    assert heavy_ball_runs(dtype) == {"equal": True, "moved": True}
    assert zo_cpu.kernels_for(HeavyBall.sweep_spec()).calls > calls, "the C kernels did not run"


TRITON_CHECK = """
import sys, json, torch
sys.path[:0] = [{tests!r}, {root!r}]
from zo.backends import triton as kernels
kernels.allow_cpu = True
calls, original = [], kernels.DeviceSweeps.sweep
kernels.DeviceSweeps.sweep = lambda *a, **kw: calls.append(1) or original(*a, **kw)
import test_zo_design
found = test_zo_design.heavy_ball_runs({dtype})
print(json.dumps(dict(found, launches=len(calls))))
"""


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_a_stateful_method_in_a_test_runs_the_triton_kernels_bit_for_bit(dtype):
    """In Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 must be set before triton is imported: a
    subprocess), the method's emitted kernels equal its torch path, weights and momentum."""
    script = TRITON_CHECK.format(tests=str(ROOT / "tests"), root=str(ROOT), dtype=dtype)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["launches"] > 0, "the Triton kernels did not run"
    assert (found["equal"], found["moved"]) == (True, True)


# ------------------------------------------------------------------------------- the design rules
def _modules() -> dict[str, Path]:
    """Every module of the suite by import name: the top-level ones and those of the zo package."""
    found = {p.stem: p for p in ROOT.glob("*.py")}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, modules) -> set[str]:
    """The suite's modules a file imports (at any depth: lazy imports count), as import names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:   # `from zo import noise` imports the module zo.noise, not zo's namespace
                full = f"{node.module}.{alias.name}"
                names.add(full if full in modules else node.module)
    return {n for n in names if n in modules}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def test_every_module_imports_without_cycles_and_the_layers_point_one_way():
    graph = import_graph()
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
    assert "zo.core" in graph and "zo.backends.triton" in graph   # the package is in the graph
    package = {m for m in graph if m.startswith("zo.")}
    methods = {m for m in package if m.startswith("zo.methods.")}
    backends = {m for m in package if m.startswith("zo.backends.")}
    assert graph["zo.noise"] == set() and graph["zo.rule"] == set() and graph["zo.hparams"] == set()
    for m in backends:
        assert graph[m] <= {"zo.noise", "zo.rule", "zo.backends"}, f"{m} imports {graph[m]}"
    assert graph["zo.sweeps"] & package <= {"zo.noise", "zo.rule"} | backends, "the sweeps know no optimizer"
    assert not graph["zo.core"] & (methods | {"zo.registry"}), "the core imports no method"
    for m in methods:
        assert not graph[m] & (backends | {"zo.sweeps", "zo.registry"}), f"{m} imports a backend or the registry"
    assert methods - {"zo.methods"} <= graph["zo.registry"]
    users = {m for m, deps in graph.items() if deps & methods and m not in package}
    assert not users, f"{sorted(users)} import a method module: read the registry, zo.registry"


def test_no_method_module_names_a_private_member_of_the_core():
    """From the AST: the private names the core defines (methods and attributes, `_x`) appear in no method module,
    and no method module imports a backend."""
    core = ast.parse((PACKAGE / "core.py").read_text())
    private = {n.name for n in ast.walk(core) if isinstance(n, ast.FunctionDef) and n.name.startswith("_")
               and not n.name.startswith("__")}
    private |= {n.attr for n in ast.walk(core) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
                and not n.attr.startswith("__") and isinstance(n.value, ast.Name) and n.value.id == "self"}
    assert {"_offset", "_measured", "_sweep", "_update_values", "_sweeper"} <= private   # the check sees them
    for path in sorted((PACKAGE / "methods").glob("*.py")):
        tree = ast.parse(path.read_text())
        named = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        named |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        named |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not named & private, f"{path.name} names private members of the core: {sorted(named & private)}"
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        assert not {m for m in imported if m and m.startswith(("zo.backends", "zo.sweeps"))}, path.name


def test_no_module_in_the_package_is_over_600_lines_and_none_elsewhere_over_820():
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 600, f"{path.relative_to(ROOT)} has {lines} lines"
    for path in ROOT.glob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 820, f"{path.name} has {lines} lines"
    assert not list(ROOT.glob("zo_*.py")), "a flat zo_* module is left beside the package"


def test_backends_name_no_optimizer():
    names = {ZOSignSGD.__name__, ZOSignSGD.name, ZOSignSGD.title}
    for cls in zo_methods.OPTIMIZERS.values():
        names |= {cls.__name__, cls.name, cls.title}
    for file in BACKENDS:
        text = (ROOT / file).read_text()
        found = sorted(n for n in names if re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", text))
        assert not found, f"{file} names optimizers {found}"


def test_tests_use_public_names_only():
    """No test reaches a project module's private name (`module._x`), nor the core's through an optimizer object."""
    modules = "|".join(sorted(p.stem for p in ROOT.glob("*.py")))
    private = re.compile(rf"(?<![\w.])(?:{modules}|zo|zo_noise|zo_rule|zo_cpu|zo_triton|kernels|sweeps|opt|optimizer|"
                         r"fused|reference|graphed|eager|ref|got|keep)\._[a-z]\w*")
    assert all(private.search(f"{m}._x(1)") for m in ("evaluator", "heads", "zo", "opt"))  # the check sees them
    for path in sorted((ROOT / "tests").glob("test_*.py")):
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


def test_a_repeated_sub_expression_is_one_node():
    """Hash-consing: z·c written twice (and u of the restore, the step and the new state) is computed once."""
    def twice(noise, state, s):
        return zo.Rule(direction=noise.z, step=noise.z * s.c + noise.z * s.c)
    graph, out, _ = zo_rule.trace("update", twice, ("z",), (), ("c",))
    ops = [graph.nodes[n][0] for n in graph.order(out.values())]
    # z·c once; the restore's z·restore_scale, y·decay once each: 3 products, 1 sum of the two equal terms
    assert ops.count("mul") == 3 and ops.count("add") == 3
    graph, out, _ = zo_rule.trace("update", ZOAdaMU.rule, ZOAdaMU.streams, ZOAdaMU.buffers,
                                  ZOAdaMU.step_values + ZOAdaMU.update_values)
    uses = [graph.nodes[n][0] for n in graph.order(out.values())]
    assert uses.count("sqrt") == 1 and uses.count("div") == 1   # u and v computed once for step, state and restore


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
    from zo.backends import triton as zo_triton
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    sweeps = zo_triton.DeviceSweeps("cpu", ZOSignSGD.sweep_spec(), tensors=1, groups=1)
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


# ------------------------------------------------------------------------------- the out-of-place form of a sweep
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("name", ["mezo", "zo_adamu", "lozo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_out_of_place_perturbation_equals_the_in_place_one(fast, name, dtype):
    """perturbed(p) reads θ and writes θ+ε·u into a new tensor: the values the probe's in-place sweep then gives p,
    bit for bit (after a step, so ZO-AdaMU's direction reads a momentum that is not 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.LayerNorm(40), nn.Linear(40, 2)).to(dtype)
    x, y = torch.randn(16, 6, dtype=dtype), torch.randn(16, 2, dtype=dtype)
    params = list(model.parameters())
    opt = zo_methods.get(name)(zo.param_groups_for_model(model, 0.1), lr=1e-2, eps=1e-2, noise_block=16,
                               chunk_numel=32)
    opt.fast_paths = fast
    loss = lambda: ((model(x) - y) ** 2).mean()   # noqa: E731
    opt.step(loss)
    before = [p.detach().clone() for p in params]
    temps = [opt.perturbed(p) if opt.elementwise(p) else None for p in params]
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "perturbed() wrote to the parameters"
    seen = []
    opt.probe(lambda: seen.append([p.detach().clone() for p in params]) or loss())
    compared = [(t, s) for t, s in zip(temps, seen[0]) if t is not None]
    assert compared and all(torch.equal(t, s) for t, s in compared)
    assert all(not torch.equal(t, b) for t, b in zip(temps, before) if t is not None)
