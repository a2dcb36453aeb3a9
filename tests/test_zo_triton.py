"""The fused Triton sweeps (zo.backends.triton) equal the counter-noise definition and the torch path bit for bit.

Run on CPU tensors in Triton's interpreter; skipped where Triton is not installed (CPU-only torch). On a GPU the same
kernels are compiled for the device (bench/zo_step.py measures them there).
"""

import importlib

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import zo  # noqa: E402
from zo import noise as zo_noise  # noqa: E402
from zo import param_groups_for_model  # noqa: E402
from zo.methods.adamu import AdaMUSchedule, ZOAdaMU  # noqa: E402
from zo.methods.family import MeZO  # noqa: E402


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def kernels(monkeypatch):
    """zo.backends.triton decorated for Triton's interpreter and allowed on CPU tensors; compiled again afterwards.  (A reload
    re-runs the module in the same module object, which zo keeps.)"""
    from zo.backends import triton as zo_triton
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    importlib.reload(zo_triton)
    monkeypatch.setattr(zo_triton, "allow_cpu", True)
    yield zo_triton
    monkeypatch.delenv("TRITON_INTERPRET")
    importlib.reload(zo_triton)


def streams(noise, state, s):
    """A rule whose direction is its second noise stream plus nothing: to read a stream through a fused sweep."""
    return zo.Rule(direction=noise.b + noise.a * 0.0, step=noise.b)


def fused_noise(kernels, seed, index, stream, n, direction, device="cpu", pos=0):
    """Stream `stream` of tensor `index`, elements [pos, pos+n), drawn by a fused perturb sweep from the step seed on
    the device (the kernel derives the tensor's counter key there)."""
    rule = streams if stream else (lambda noise, state, s: zo.Rule(direction=noise.a, step=noise.a))
    names = ("a", "b") if stream else ("a",)
    sweeps = kernels.DeviceSweeps(device, zo.rule.SweepSpec(rule, names), tensors=index + 1, groups=1)
    sweeps.load(seed, {}, 0, None, None)
    got = torch.zeros(n, device=device)
    sweeps.sweep("perturb", got, index=index, group_index=0, gaussian=direction == "gaussian", perturb_scale=1.0,
                 restore_scale=0.0, stash=None, buffers=[], carry=False, pos=pos)
    return got


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
@pytest.mark.parametrize("n", [1, 7, 1024, 2501])
@pytest.mark.parametrize("seed, index, stream", [(zo.step_seed(5, 3), 2, 0), (zo.step_seed(5, 3), 2, 1),
                                                 ((1 << 64) - 12345, 3_000, 0), (3, 0, 1)])
def test_fused_noise_is_the_counter_stream(kernels, direction, n, seed, index, stream):
    """The kernel derives each tensor's noise key from the step seed on the device (zo_noise.counter_key)."""
    got = fused_noise(kernels, seed, index, stream, n, direction)
    want = zo_noise.counter_noise(zo_noise.counter_key(seed, index, stream), 0, n, direction, "cpu")
    assert torch.equal(got, want)


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
@pytest.mark.parametrize("pos", [1, 63, 1025, 4096 + 77])
def test_fused_sweep_of_a_shard_draws_its_slice(kernels, direction, pos):
    """A tensor whose first element is element `pos` of a longer flattened tensor (an FSDP shard) draws exactly
    that slice of the stream, from any position (odd ones split a Box–Muller pair, others a Rademacher word)."""
    seed = zo.step_seed(1, 2)
    got = fused_noise(kernels, seed, 4, 0, 1500, direction, pos=pos)
    want = zo_noise.counter_noise(zo_noise.counter_key(seed, 4, 0), pos, 1500, direction, "cpu")
    assert torch.equal(got, want)


def test_rademacher_blocks_need_whole_hash_words(kernels, monkeypatch):
    # a block of 16 pairs would split a 64-element hash word between two programs: refused, not silently wrong
    monkeypatch.setattr(kernels, "PAIRS", 16)
    with pytest.raises(ValueError, match="PAIRS = 16.*multiple of 32"):
        fused_noise(kernels, 1, 0, 0, 100, "rademacher")


def small_model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 40), nn.LayerNorm(40), nn.Linear(40, 3)).to(dtype)


def run_steps(model, make, fused: bool, nan_at: int = 2, steps: int = 4, settle: bool = False):
    torch.manual_seed(1)
    device = model[0].weight.device
    x, y = torch.randn(8, 12, device=device), torch.randn(8, 3, device=device)
    optimizer = make(param_groups_for_model(model, 0.1))
    optimizer.fast_paths = fused
    for t in range(steps):
        def closure():
            loss = ((model(x.to(model[0].weight.dtype)).float() - y) ** 2).mean()
            return loss * float("nan") if t == nan_at else loss
        optimizer.step(closure)
        if settle and t == 1:
            optimizer.settle()  # an evaluation or checkpoint mid-run
    return optimizer


OPTIMIZERS = {
    "mezo": lambda groups, **kw: MeZO(groups, lr=1e-2, eps=1e-2, **kw),
    "adamu": lambda groups, **kw: ZOAdaMU(groups, lr=1e-2, eps=1e-2, schedule=AdaMUSchedule(1, 3, 4), **kw),
    "adamu_unsigned_bf16_state": lambda groups, **kw: ZOAdaMU(groups, lr=1e-2, eps=1e-2, signed_momentum=False,
                                                              state_dtype=torch.bfloat16,
                                                              schedule=AdaMUSchedule(1, 3, 4), **kw),
    "mezo_rademacher": lambda groups, **kw: MeZO(groups, lr=1e-2, eps=1e-2, direction="rademacher", **kw),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("exact_restore", [True, False])
def test_fused_steps_equal_the_torch_path(kernels, monkeypatch, dtype, name, exact_restore):
    make = lambda groups: OPTIMIZERS[name](groups, exact_restore=exact_restore)  # noqa: E731
    fused_model, torch_model = small_model(dtype), small_model(dtype)
    calls = []
    original = kernels.DeviceSweeps.sweep
    monkeypatch.setattr(kernels.DeviceSweeps, "sweep", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    fused = run_steps(fused_model, make, fused=True)
    assert calls, "the fused path was not taken"
    calls.clear()
    reference = run_steps(torch_model, make, fused=False)
    assert not calls, "the torch path launched a fused kernel"
    assert fused.noise_calls == reference.noise_calls
    assert fused.skipped_steps.item() == reference.skipped_steps.item() == 1
    before = small_model(dtype)
    for (name_, a), b, start in zip(fused_model.named_parameters(), torch_model.parameters(), before.parameters()):
        assert torch.equal(a, b), name_
        assert not torch.equal(a, start), name_   # the steps did move every tensor
    for p_fused, p_ref in zip(fused_model.parameters(), torch_model.parameters()):
        if "momentum" in fused.state[p_fused]:
            assert torch.equal(fused.state[p_fused]["momentum"], reference.state[p_ref]["momentum"])


@cuda
@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_cuda_draws_the_cpu_directions(direction):
    from zo.backends import triton as zo_triton
    assert zo_noise.resolve_rng("auto", "cuda") == "counter"
    seed, n = zo.step_seed(5, 3), 3 * 2**20 + 5
    for index, stream in ((2, 0), (2, 1), (643, 1)):
        key = zo_noise.counter_key(seed, index, stream)
        cpu = zo_noise.counter_noise(key, 0, n, direction, "cpu")
        assert torch.equal(fused_noise(zo_triton, seed, index, stream, n, direction, "cuda").cpu(), cpu)
        assert torch.equal(zo_noise.counter_noise(key, 0, n, direction, "cuda").cpu(), cpu)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("exact_restore", [True, False])
def test_cuda_fused_steps_equal_the_torch_path(dtype, name, exact_restore):
    from zo.backends import triton as zo_triton
    # one launch per tensor and sweep, which the count below relies on (CUDA graphs replay a whole sweep at once:
    # test_cuda_graph_sweeps_equal_eager_launches holds them to these launches)
    make = lambda groups: OPTIMIZERS[name](groups, exact_restore=exact_restore, cuda_graphs=False)  # noqa: E731
    fused_model, torch_model = small_model(dtype).cuda(), small_model(dtype).cuda()
    calls = []
    original = zo_triton.DeviceSweeps.sweep
    zo_triton.DeviceSweeps.sweep = lambda *a, **kw: calls.append(1) or original(*a, **kw)
    try:
        fused = run_steps(fused_model, make, fused=True)
        assert len(calls) >= 3 * 4 * len(list(fused_model.parameters())) - 2, "not every sweep was fused"
        calls.clear()
        reference = run_steps(torch_model, make, fused=False)
        assert not calls
    finally:
        zo_triton.DeviceSweeps.sweep = original
    assert zo_triton.supports(next(fused_model.parameters()))
    for (name_, a), b in zip(fused_model.named_parameters(), torch_model.parameters()):
        assert torch.equal(a, b), name_
    for p_fused, p_ref in zip(fused_model.parameters(), torch_model.parameters()):
        if "momentum" in fused.state[p_fused]:
            assert torch.equal(fused.state[p_fused]["momentum"], reference.state[p_ref]["momentum"])


def check_carry(make, dtype, device):
    fused_model, torch_model = small_model(dtype).to(device), small_model(dtype).to(device)
    fused = run_steps(fused_model, lambda g: make(g, carry_perturbation=True), fused=True, settle=True)
    reference = run_steps(torch_model, lambda g: make(g, carry_perturbation=True), fused=False, settle=True)
    assert fused.carried and reference.carried
    # 4 steps, settled after step 2: the fused path sweeps 3+2, 1 (settle), 3+2 times; the torch path 4+3, 1, 4+3
    assert (fused.sweeps, reference.sweeps) == (11, 15)
    assert fused.noise_calls == reference.noise_calls  # the same directions drawn, in fewer sweeps
    for p_fused, p_ref in zip(fused_model.parameters(), torch_model.parameters()):
        if "momentum" in fused.state[p_fused]:
            assert torch.equal(fused.state[p_fused]["momentum"], reference.state[p_ref]["momentum"])
    for stage in ("carried", "settled"):
        for (name_, a), b in zip(fused_model.named_parameters(), torch_model.parameters()):
            assert torch.equal(a, b), (stage, name_)
        fused.settle()
        reference.settle()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("exact_restore", [True, False])
def test_fused_carry_equals_the_torch_path(kernels, dtype, name, exact_restore):
    """The update fused with the next step's perturbation (one kernel) = the update sweep then the perturb sweep."""
    make = lambda groups, **kw: OPTIMIZERS[name](groups, exact_restore=exact_restore, **kw)  # noqa: E731
    check_carry(make, dtype, "cpu")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("exact_restore", [True, False])
def test_cuda_fused_carry_equals_the_torch_path(dtype, name, exact_restore):
    make = lambda groups, **kw: OPTIMIZERS[name](groups, exact_restore=exact_restore, **kw)  # noqa: E731
    check_carry(make, dtype, "cuda")


def graph_run(model, make, cuda_graphs: bool, carry: bool):
    """Seven steps that vary everything a captured sweep must not bake in: the LR (a scheduler), a skipped step
    (NaN loss), two probes in one step (accumulation), a settle, a reload of the optimizer state (new momentum
    buffers) and a tensor frozen mid-run (another set of tensors to sweep)."""
    torch.manual_seed(1)
    x, y = torch.randn(8, 12, device="cuda"), torch.randn(8, 3, device="cuda")
    optimizer = make(param_groups_for_model(model, 0.1), cuda_graphs=cuda_graphs, carry_perturbation=carry)
    for t in range(7):
        def closure():
            loss = ((model(x.to(model[0].weight.dtype)).float() - y) ** 2).mean()
            return loss * float("nan") if t == 2 else loss
        if t == 3:
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
            optimizer.settle()
            optimizer.load_state_dict(optimizer.state_dict())
        if t == 5:
            model[0].bias.requires_grad_(False)
        if t == 4:
            optimizer.probe(closure)
        optimizer.step(closure)
    optimizer.settle()
    return optimizer


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["mezo", "adamu", "mezo_rademacher"])
@pytest.mark.parametrize("carry", [False, True])
def test_cuda_graph_sweeps_equal_eager_launches(dtype, name, carry):
    """Each distinct sweep is captured once and replayed; the replays equal eager kernel launches bit for bit."""
    graphed_model, eager_model = small_model(dtype).cuda(), small_model(dtype).cuda()
    graphed = graph_run(graphed_model, OPTIMIZERS[name], True, carry)
    eager = graph_run(eager_model, OPTIMIZERS[name], False, carry)
    assert graphed.replays and not eager.replays, "the graphed run did not replay, or the eager run did"
    assert graphed.sweeps == eager.sweeps and graphed.noise_calls == eager.noise_calls
    assert graphed.skipped_steps.item() == eager.skipped_steps.item() == 1
    for (name_, a), b in zip(graphed_model.named_parameters(), eager_model.parameters()):
        assert torch.equal(a, b), name_
    for p_graphed, p_eager in zip(graphed_model.parameters(), eager_model.parameters()):
        if "momentum" in graphed.state[p_graphed]:
            assert torch.equal(graphed.state[p_graphed]["momentum"], eager.state[p_eager]["momentum"])


def registry_method(name):
    """--zo_optim `name` at test settings: a short ZO-AdaMU schedule, LOZO's factor redrawn within the run."""
    from zo import registry as zo_methods
    kw = {"zo_adamu": dict(schedule=AdaMUSchedule(1, 3, 4)), "lozo": dict(interval=2), "lozo_m": dict(interval=2),
          "subzero": dict(interval=2, rank=4), "fzoo": dict(num_directions=3)}.get(name, {})
    return lambda groups, **more: zo_methods.get(name)(groups, lr=1e-2, eps=1e-2, **kw, **more)


def assert_same_state(fused, reference, fused_model, torch_model):
    for (name, a), b in zip(fused_model.named_parameters(), torch_model.parameters()):
        assert torch.equal(a, b), name
        for key, value in fused.state[a].items():
            if torch.is_tensor(value):
                assert torch.equal(value, reference.state[b][key]), (name, key)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", zo.OPTIMIZERS)
def test_cuda_every_registered_method_equals_its_torch_path(dtype, name):
    """Each --zo_optim on a CUDA device (its fused sweeps where the method has them) equals the torch path bit for
    bit, weights and state, through a skipped (non-finite) step."""
    make = registry_method(name)
    fused_model, torch_model = small_model(dtype).cuda(), small_model(dtype).cuda()
    fused = run_steps(fused_model, make, fused=True)
    reference = run_steps(torch_model, make, fused=False)
    assert_same_state(fused, reference, fused_model, torch_model)


@cuda
@pytest.mark.parametrize("name", ["mezo", "zo_adamu", "zo_adam", "fzoo"])
def test_cuda_several_directions_a_step_equal_the_torch_path(name):
    make = registry_method(name)
    models_, optimizers = [], []
    for fused in (True, False):
        model = small_model(torch.float32).cuda()
        torch.manual_seed(1)
        x, y = torch.randn(8, 12, device="cuda"), torch.randn(8, 3, device="cuda")
        optimizer = make(param_groups_for_model(model, 0.1))
        optimizer.fast_paths = fused
        for _ in range(3):
            optimizer.probe_directions(lambda: ((model(x) - y) ** 2).mean(), range(3))
            optimizer.step()
        models_.append(model)
        optimizers.append(optimizer)
    assert_same_state(*optimizers, *models_)
