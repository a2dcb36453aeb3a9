"""Tests of zo.py: the ZO maths against dense textbook references, numerics, protocol and checkpointing."""
import io
import math
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import zo  # noqa: E402
from zo.backends import cpu as zo_cpu  # noqa: E402
from zo import noise as zo_noise  # noqa: E402
from zo import param_groups_for_model, sample_direction, step_seed  # noqa: E402
from zo.methods.adamu import AdaMUSchedule, ZOAdaMU, anneal  # noqa: E402
from zo.methods.family import MeZO  # noqa: E402

needs_kernels = pytest.mark.skipif(not zo.kernels_available(), reason="no C compiler: only the torch path exists")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the tensors here are tiny: intra-op threads only add overhead (and stall on a busy 2-core box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


NB = 16  # small noise block so the tiny test tensors span several blocks and chunks
NO_DECAY = {"lin1.bias", "norm.weight", "norm.bias", "lin2.bias"}


class Tiny(nn.Module):
    """Linear + LayerNorm + tied embedding / output head."""

    def __init__(self, vocab=11, d=8, h=12):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin1 = nn.Linear(d, h)
        self.norm = nn.LayerNorm(h)
        self.lin2 = nn.Linear(h, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.lin2(self.norm(torch.tanh(self.lin1(self.emb(ids))))))


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = Tiny().to(dtype)
    with torch.no_grad():  # non-trivial norm params so that decaying them would show
        model.norm.weight.add_(0.3 * torch.randn_like(model.norm.weight))
        model.norm.bias.add_(0.3 * torch.randn_like(model.norm.bias))
    return model


def make_data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (n, 5), generator=g), torch.randn(n, 5, 11, generator=g)


def mse(model, ids, target):
    return lambda: ((model(ids).to(target.dtype) - target) ** 2).mean()


def ordered_names(model):
    """Parameter names in the optimizer's order (decay group, then no-decay group)."""
    names = [n for n, _ in model.named_parameters()]
    return [n for n in names if n not in NO_DECAY] + [n for n in names if n in NO_DECAY]


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------ noise
def test_step_seed_is_pure_and_distinct():
    assert step_seed(3, 7) == step_seed(3, 7)
    seeds = {step_seed(b, t) for b in range(4) for t in range(50)}
    assert len(seeds) == 200


@pytest.mark.parametrize("rng", ["counter", "torch"])
def test_noise_distribution_and_independence(rng):
    n = 200_000
    s0, s1 = step_seed(0, 0), step_seed(0, 1)
    draw = lambda seed, index, **kw: sample_direction(seed, index, n, noise_block=n // 2, rng=rng, **kw)  # noqa
    z = draw(s0, 0)
    assert torch.equal(z, draw(s0, 0))  # determinism
    assert z.dtype == torch.float32 and abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.02
    corr = lambda a, b: float(torch.corrcoef(torch.stack([a, b]))[0, 1])  # noqa: E731
    others = {"tensor": draw(s0, 1), "step": draw(s1, 0), "stream": draw(s0, 0, stream=1),
              "base seed": draw(step_seed(1, 0), 0)}
    for name, o in others.items():
        assert abs(corr(z, o)) < 0.015, name
        assert abs(corr(z.square(), o.square())) < 0.015, name
    assert abs(corr(z[: n // 2], z[n // 2:])) < 0.02  # block 0 vs block 1 of one tensor
    for lag in (1, 2, 3, 7):  # neighbours (a Box–Muller pair shares its radius: squares must not correlate)
        assert abs(corr(z[:-lag], z[lag:])) < 0.015, lag
        assert abs(corr(z[:-lag].square(), z[lag:].square())) < 0.015, lag
    r = draw(s0, 0, direction="rademacher")
    assert set(r.unique().tolist()) == {-1.0, 1.0} and abs(r.mean()) < 0.01
    assert abs(corr(r, draw(s0, 1, direction="rademacher"))) < 0.015
    for lag in (1, 2, 31, 32, 63, 64, 65, 128):  # bits of one hash word, and of neighbouring words
        assert abs(corr(r[:-lag], r[lag:])) < 0.015, lag
    words = r[: n // 64 * 64].view(-1, 64)   # each of the 64 bit positions is balanced on its own
    assert float((words.mean(0)).abs().max()) < 4.5 / math.sqrt(n // 64)


def test_counter_noise_is_standard_normal():
    """Box–Muller with polynomial ln/sin/cos: the moments, the CDF (Kolmogorov–Smirnov) and the tails of N(0, 1)."""
    n = 2_000_000
    z = sample_direction(step_seed(11, 0), 3, n).double()
    assert abs(z.mean()) < 4 / math.sqrt(n)                       # 4 sigma
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs((z ** 3).mean()) < 4 * math.sqrt(15 / n)           # skewness
    assert abs((z ** 4).mean() - 3) < 4 * math.sqrt(96 / n)       # kurtosis
    x = z.sort().values
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    ks = max(float((torch.arange(1, n + 1, dtype=torch.float64) / n - cdf).abs().max()),
             float((cdf - torch.arange(n, dtype=torch.float64) / n).abs().max()))
    assert ks < 1.95 / math.sqrt(n)                               # KS at the 0.1 % level
    for k in (1, 2, 3, 4):
        expect = math.erfc(k / math.sqrt(2))
        got = float((z.abs() > k).double().mean())
        assert abs(got - expect) < 5 * math.sqrt(expect * (1 - expect) / n) + 1e-6, k
    assert float(z.abs().max()) <= math.sqrt(-2 * math.log(2.0 ** -24)) + 1e-5  # 24-bit u1
    # the angle of each Box–Muller pair is uniform: the pair's quadrant counts are balanced
    q = (z[0::2] >= 0).long() * 2 + (z[1::2] >= 0).long()
    counts = torch.bincount(q, minlength=4).double()
    assert float(((counts - n / 8) ** 2 / (n / 8)).sum()) < 16.3  # chi-square, 3 dof, 0.1 %


def _splitmix64(key: int, i: int) -> int:
    """Output i+1 of splitmix64 seeded with `key`, in Python integers (independent of zo's implementations)."""
    mask = (1 << 64) - 1
    z = (key + (i + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


@pytest.mark.parametrize("use_kernels", [pytest.param(True, marks=needs_kernels), False])
def test_rademacher_is_bit_j_mod_64_of_hash_j_div_64(use_kernels):
    """The definition in zo's docstring, from any start (C kernel and torch path)."""
    key = zo_noise.counter_key(step_seed(3, 1), 2, 0)
    for start, n in ((0, 256), (61, 130), (1, 1), (127, 3), (4095, 70)):
        want = [-1.0 if (_splitmix64(key, j >> 6) >> (j & 63)) & 1 else 1.0 for j in range(start, start + n)]
        got = (zo_cpu.fill(torch.empty(n), key, start, "rademacher") if use_kernels
               else zo_noise.counter_noise(key, start, n, "rademacher", "cpu"))
        assert got.tolist() == want, (start, n)


def test_counter_noise_golden_values():
    """The counter stream is the definition of what a seed means: these numbers must never change silently
    (the C kernel, the torch implementation and every platform give exactly these)."""
    z = sample_direction(step_seed(0, 0), 0, 6)
    assert [float(v).hex() for v in z] == ['-0x1.50f9500000000p+1', '-0x1.b6a6dc0000000p-5', '-0x1.3564ae0000000p-6',
                                           '0x1.b34cf00000000p-5', '0x1.33a0080000000p+0', '0x1.37c5540000000p+1']
    # the Rademacher stream changed on 2026-11-26 (one hash per 64 elements; until then the top bit of one hash per
    # element gave [1, -1, 1, 1, 1, -1, -1, -1] here): Rademacher runs from before draw other directions
    assert sample_direction(step_seed(0, 0), 0, 8, direction="rademacher").tolist() == [-1, -1, 1, -1, -1, 1, 1, -1]
    torch.testing.assert_close(sample_direction(step_seed(5, 3), 2, 4, stream=1),
                               torch.tensor([-0.5452072620391846, -0.9699419140815735, -0.32391253113746643,
                                             -0.26907745003700256]), rtol=0, atol=0)


@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_counter_noise_torch_definition_and_slices(direction):
    """The pure-torch implementation is the definition; any [start, start+n) is a slice of the whole stream."""
    key = zo_noise.mix(123, 4, 5)
    whole = zo_noise.counter_noise(key, 0, 5001, direction, "cpu")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        start = int(torch.randint(0, 5000, (), generator=g))
        n = int(torch.randint(0, 5001 - start, (), generator=g))
        assert torch.equal(zo_noise.counter_noise(key, start, n, direction, "cpu"), whole[start:start + n])
        if zo.kernels_available():
            got = zo_cpu.fill(torch.empty(n), key, start, direction)
            assert torch.equal(got, whole[start:start + n]), (start, n)


@needs_kernels
@pytest.mark.parametrize("direction", ["gaussian", "rademacher"])
def test_counter_kernel_equals_torch_definition_at_scale(direction):
    """Bit for bit over 3M elements (every lane position, odd starts, both halves of the Box–Muller pairs)."""
    for seed, start, n in ((1, 0, 1 << 20), (2, 12345679, 1 << 20 | 3), (3, 1, 999_999)):
        key = zo_noise.counter_key(step_seed(seed, 0), seed, 0)
        assert torch.equal(zo_cpu.fill(torch.empty(n), key, start, direction),
                           zo_noise.counter_noise(key, start, n, direction, "cpu")), (seed, start, n)


@pytest.mark.parametrize("cls", [MeZO, ZOAdaMU])
def test_global_rng_untouched(cls):
    model = make_model()
    ids, tgt = make_data()
    opt = cls(param_groups_for_model(model, 0.1), lr=1e-3, eps=1e-2, noise_block=NB)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for _ in range(3):
        opt.step(mse(model, ids, tgt))
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("cls", [MeZO, ZOAdaMU])
def test_processing_chunk_size_does_not_change_noise(cls):
    """The noise is defined per noise_block; chunk_numel only changes how much is processed at once."""
    ids, tgt = make_data()
    finals, calls = [], []
    extra = dict(schedule=AdaMUSchedule(1, 3, 4)) if cls is ZOAdaMU else {}
    for chunk in (NB, 3 * NB, 1 << 16):
        model = make_model()
        opt = cls(param_groups_for_model(model, 0.1), lr=1e-2, eps=1e-2, noise_block=NB, chunk_numel=chunk, **extra)
        for _ in range(4):
            opt.step(mse(model, ids, tgt))
        finals.append(params_of(model))
        calls.append(opt.noise_calls)
    assert calls[0] > calls[1] > calls[2]  # really processed in different chunkings
    for f in finals[1:]:
        assert all(torch.equal(f[k], finals[0][k]) for k in f)
    # ... while the noise block is part of the definition of rng="torch" only; the counter stream has no blocks
    for rng, changes in (("counter", False), ("torch", True)):
        one, two = make_model(), make_model()
        MeZO(param_groups_for_model(one, 0.1), lr=1e-2, eps=1e-2, noise_block=NB, rng=rng).step(mse(one, ids, tgt))
        MeZO(param_groups_for_model(two, 0.1), lr=1e-2, eps=1e-2, noise_block=2 * NB, rng=rng).step(
            mse(two, ids, tgt))
        assert torch.equal(one.lin1.weight, two.lin1.weight) != changes, rng
    assert not torch.equal(one.lin1.weight, make_model().lin1.weight)


# ------------------------------------------------------------------------------ dense references
def test_param_groups_by_module_type():
    class MyRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    class Odd(nn.Module):  # name contains "layernorm" but the module is not a norm: decayed
        def __init__(self):
            super().__init__()
            self.layernorm_weight = nn.Parameter(torch.ones(4))

    m = nn.ModuleDict(dict(a=nn.Linear(4, 4), b=MyRMSNorm(), c=Odd(), d=nn.BatchNorm1d(4), e=nn.GroupNorm(2, 4),
                           f=nn.Linear(4, 4), g=nn.Linear(4, 4)))
    if hasattr(nn, "RMSNorm"):
        m["h"] = nn.RMSNorm(4)
    m["f"].weight = m["a"].weight  # tied: listed once
    m["g"].requires_grad_(False)  # frozen: not listed
    decay, plain = param_groups_for_model(m, 0.5)
    assert decay["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(m["a"].weight), id(m["c"].layernorm_weight)]
    expect = [m["a"].bias, m["b"].weight, m["d"].weight, m["d"].bias, m["e"].weight, m["e"].bias, m["f"].bias]
    if hasattr(nn, "RMSNorm"):
        expect.append(m["h"].weight)
    assert [id(p) for p in plain["params"]] == [id(p) for p in expect]
    model = make_model()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups_for_model(model, 0.1)
    assert [names[id(p)] for p in groups[1]["params"]] == [n for n in ordered_names(model) if n in NO_DECAY]


def _run_reference(cls, model, ids, tgt, steps, lr, eps, wd, **kw):
    """Textbook dense algorithm on plain tensors, noise replayed via sample_direction."""
    names = ordered_names(model)
    theta = params_of(model)
    m = {n: torch.zeros_like(theta[n]) for n in names}
    sched = kw.get("schedule")

    def loss(params):
        out = torch.func.functional_call(model, params, (ids,))
        return ((out.to(tgt.dtype) - tgt) ** 2).mean()

    for t in range(steps):
        seed = step_seed(kw.get("seed", 0), t)
        noise = lambda i, n, s: sample_direction(seed, i, theta[n].numel(), stream=s,  # noqa: E731
                                                 noise_block=NB, rng=kw.get("rng", "auto")
                                                 ).view_as(theta[n]).to(theta[n].dtype)
        if cls is MeZO:
            u = {n: noise(i, n, 0) for i, n in enumerate(names)}
            w = u
        else:
            a, b1, b2 = sched.values(t)
            zd = {n: math.sqrt(a) * noise(i, n, 0) for i, n in enumerate(names)}
            zdd = {n: m[n] + math.sqrt(1 - a) * noise(i, n, 1) for i, n in enumerate(names)}
            u = {n: b1 * zd[n] + (1 - b1) * zdd[n] for n in names}
            w = {n: u[n] / torch.sqrt(b2 * zd[n] ** 2 + (1 - b2) * zdd[n] ** 2 + 1e-8) for n in names}
        with torch.no_grad():
            lp = loss({n: theta[n] + eps * u[n] for n in names})
            lm = loss({n: theta[n] - eps * u[n] for n in names})
        g = float((lp - lm) / (2 * eps))
        for n in names:
            lam = 0.0 if n in NO_DECAY else wd
            theta[n] = theta[n] - lr * (g * w[n] + lam * theta[n])
            m[n] = (1.0 if g >= 0 or not kw.get("signed_momentum", True) else -1.0) * u[n]
    return theta, m


@pytest.mark.parametrize("cls,kw", [
    (MeZO, {}), (MeZO, dict(keep_direction=True)), (MeZO, dict(exact_restore=True, seed=3)),
    (ZOAdaMU, dict(schedule=AdaMUSchedule(1, 4, 6))),
    (ZOAdaMU, dict(schedule=AdaMUSchedule(1, 4, 6), signed_momentum=False)),
    (ZOAdaMU, dict(schedule=AdaMUSchedule(1, 4, 6), keep_direction=True, exact_restore=True)),
    (MeZO, dict(rng="torch")), (ZOAdaMU, dict(schedule=AdaMUSchedule(1, 4, 6), rng="torch")),
    (MeZO, dict(chunk_numel=3 * NB, exact_restore=True, keep_direction=True)),
    (ZOAdaMU, dict(schedule=AdaMUSchedule(1, 4, 6), chunk_numel=2 * NB, exact_restore=True)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_matches_dense_reference(cls, kw, dtype):
    """fp64 pins the formulas down to 1e-10; fp32 shows the fp32 path is the same up to round-off."""
    # fp32: few steps, since ZO-AdaMU's u/sqrt(v+σ) amplifies round-off where v ~ 0 (cancellation)
    lr, eps, wd, steps = 1e-2, 1e-2, 0.5, (4 if dtype == torch.float32 else 7)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    ids, tgt = make_data()
    tgt = tgt.to(dtype)
    model = make_model(dtype=dtype)
    opt = cls(param_groups_for_model(model, wd), lr=lr, eps=eps, noise_block=NB, **kw)
    ref_theta, ref_m = _run_reference(cls, make_model(dtype=dtype), ids, tgt, steps, lr, eps, wd, **kw)
    for _ in range(steps):
        opt.step(mse(model, ids, tgt))
    got = params_of(model)
    for n in ref_theta:
        torch.testing.assert_close(got[n], ref_theta[n], **tol, msg=n)
    if cls is ZOAdaMU:
        for n, p in model.named_parameters():
            torch.testing.assert_close(opt.state[p]["momentum"], ref_m[n], **tol)
    assert opt.step_count == steps


def test_rademacher_matches_dense_reference():
    lr, eps, wd, steps = 1e-2, 1e-2, 0.5, 5
    ids, tgt = make_data()
    tgt = tgt.double()
    model, ref = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    opt = MeZO(param_groups_for_model(model, wd), lr=lr, eps=eps, noise_block=NB, direction="rademacher")
    names = ordered_names(ref)
    theta = params_of(ref)
    for t in range(steps):
        seed = step_seed(0, t)
        z = {n: sample_direction(seed, i, theta[n].numel(), direction="rademacher", noise_block=NB)
             .view_as(theta[n]).double() for i, n in enumerate(names)}
        f = lambda d: ((torch.func.functional_call(ref, d, (ids,)) - tgt) ** 2).mean()  # noqa: E731
        g = float((f({n: theta[n] + eps * z[n] for n in names}) - f({n: theta[n] - eps * z[n] for n in names}))
                  / (2 * eps))
        theta = {n: theta[n] - lr * (g * z[n] + (0 if n in NO_DECAY else wd) * theta[n]) for n in names}
        opt.step(mse(model, ids, tgt))
    got = params_of(model)
    for n in names:
        torch.testing.assert_close(got[n], theta[n], rtol=1e-10, atol=1e-10)


def test_weight_decay_only_on_decay_group():
    """With g forced to 0 (constant loss) only weight decay acts: θ <- (1-lr·λ)θ on the decay group."""
    model = make_model()
    before = params_of(model)
    opt = MeZO(param_groups_for_model(model, 0.5), lr=0.1, eps=1e-2, noise_block=NB, exact_restore=True)
    opt.step(lambda: torch.tensor(1.0))
    for n, p in model.named_parameters():
        expect = before[n] if n in NO_DECAY else before[n] * 0.95
        torch.testing.assert_close(p.detach(), expect, rtol=1e-6, atol=0)


def test_signed_momentum_keeps_direction_when_g_is_zero():
    """sign(0) = +1: a flat probe stores m = u instead of collapsing the momentum centre to zero."""
    model = make_model()
    opt = ZOAdaMU(param_groups_for_model(model, 0.0), lr=1e-2, eps=1e-2, noise_block=NB)  # t=0 < T1: u = n1
    opt.step(lambda: torch.tensor(2.0))
    assert float(opt.last_projected_grad) == 0.0
    for i, n in enumerate(ordered_names(model)):
        p = model.get_parameter(n)
        u = sample_direction(step_seed(0, 0), i, p.numel(), noise_block=NB).view_as(p)
        assert torch.equal(opt.state[p]["momentum"], u), n


def test_fused_update_equals_four_sweep_slow_path():
    """MeZO's own in-place order (+ε, -2ε, +ε restore, separate update) vs the fused 3-sweep optimizer.
    fp64: at this lr the weights grow fast and fp32 round-off of the loss difference (÷2ε) would compound."""
    lr, eps, wd = 3e-2, 1e-2, 0.5
    ids, tgt = make_data()
    tgt = tgt.double()
    fast, slow = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    opt = MeZO(param_groups_for_model(fast, wd), lr=lr, eps=eps, noise_block=NB)
    groups = param_groups_for_model(slow, wd)
    plist = [(p, gr["weight_decay"]) for gr in groups for p in gr["params"]]
    for t in range(5):
        seed = step_seed(0, t)
        z = [sample_direction(seed, i, p.numel(), noise_block=NB).view_as(p).double()
             for i, (p, _) in enumerate(plist)]
        with torch.no_grad():
            for (p, _), zi in zip(plist, z):
                p.add_(zi, alpha=eps)
            lp = mse(slow, ids, tgt)()
            for (p, _), zi in zip(plist, z):
                p.add_(zi, alpha=-2 * eps)
            lm = mse(slow, ids, tgt)()
            for (p, _), zi in zip(plist, z):
                p.add_(zi, alpha=eps)
            g = float((lp - lm) / (2 * eps))
            for (p, lam), zi in zip(plist, z):
                p.sub_(lr * (g * zi + lam * p))
        opt.step(mse(fast, ids, tgt))
        assert opt.sweeps == 3 * (t + 1)
    for (n, a), b in zip(fast.named_parameters(), slow.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11, msg=n)


@pytest.mark.parametrize("cls", [MeZO, ZOAdaMU])
def test_keep_direction_equals_regenerated_noise(cls):
    ids, tgt = make_data()
    runs = []
    for keep in (False, True):
        model = make_model()
        opt = cls(param_groups_for_model(model, 0.1), lr=1e-2, eps=1e-2, noise_block=NB, keep_direction=keep,
                  **(dict(schedule=AdaMUSchedule(1, 3, 5)) if cls is ZOAdaMU else {}))
        for _ in range(5):
            opt.probe(mse(model, ids[:4], tgt[:4]))
            opt.probe(mse(model, ids[4:], tgt[4:]))
            opt.step()
        runs.append((params_of(model), opt.noise_calls))
    (a, calls_regen), (b, calls_keep) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert calls_keep * 5 == calls_regen  # 1 noise sweep per step instead of 5 (two probes + update)


def _carry_run(cls, carry, steps=5, settle_at=(), nan_step=2, perturb_next=False, **kw):
    """steps with 2 probes each (accumulation), one skipped (NaN) step, settle() after the steps in settle_at.
    perturb_next (uncarried): return the weights of the next step's first probe θ+εu (what a carried run holds at
    the end), read inside that probe's closure, and the optimizer state as before that probe."""
    ids, tgt = make_data()
    model = make_model()
    extra = dict(schedule=AdaMUSchedule(1, 3, 6)) if cls is ZOAdaMU else {}
    opt = cls(param_groups_for_model(model, 0.1), lr=1e-2, eps=1e-2, noise_block=NB, carry_perturbation=carry,
              **extra, **kw)
    for t in range(steps):
        opt.probe(mse(model, ids[:4], tgt[:4]))
        opt.probe((lambda: torch.tensor(float("nan"))) if t == nan_step else mse(model, ids[4:], tgt[4:]))
        opt.step()
        assert opt.carried == carry
        if t in settle_at:
            opt.settle()
    if not carry and perturb_next:
        seen = []
        opt.probe(lambda: seen.append(params_of(model)) or torch.tensor(0.0))
        return model, opt, seen[0]
    return model, opt, params_of(model)
def _moms(opt):
    return [opt.state[p]["momentum"] for group in opt.param_groups for p in group["params"]
            if "momentum" in opt.state[p]]


@pytest.mark.parametrize("cls", [MeZO, ZOAdaMU])
@pytest.mark.parametrize("kw", [{}, dict(exact_restore=True), dict(direction="rademacher")])
def test_carried_perturbation_equals_the_uncarried_run(cls, kw):
    """Carrying the next step's +εu in the update changes nothing up to the first settle(): each step's update is
    applied to the same rounded weights and the next perturbation to the same rounded result."""
    _, ref, want = _carry_run(cls, False, perturb_next=True, **kw)
    got_model, got, have = _carry_run(cls, True, **kw)
    assert int(ref.skipped_steps) == int(got.skipped_steps) == 1
    assert ref.last_schedule == got.last_schedule and got.carried
    assert all(torch.equal(have[n], want[n]) for n in want)
    want_m, have_m = _moms(ref), _moms(got)
    assert len(want_m) == len(have_m) and all(torch.equal(a, b) for a, b in zip(have_m, want_m))
    assert got.sweeps == ref.sweeps - 1  # off CUDA the carry is the same sweeps in another order (ref: +1 probe)
    got.settle()
    assert not got.carried and got.sweeps == ref.sweeps
    if kw.get("exact_restore"):  # settling from the stash lands exactly on the uncarried run's weights
        final = _carry_run(cls, False, **kw)[2]
        assert all(torch.equal(p, final[n]) for n, p in params_of(got_model).items())


@pytest.mark.parametrize("cls", [MeZO, ZOAdaMU])
def test_settling_a_carried_perturbation(cls):
    """settle() mid-run (evaluation, checkpoints) is bit-exact with a stash and a round trip of ~1 ulp without."""
    def finished(carry, **kw):
        model, opt, _ = _carry_run(cls, carry, settle_at=(1, 3), **kw)
        opt.settle()  # the end of training
        return params_of(model)
    exact = [finished(carry, exact_restore=True) for carry in (False, True)]
    assert all(torch.equal(exact[0][n], exact[1][n]) for n in exact[0])
    plain = [finished(carry) for carry in (False, True)]
    assert any(not torch.equal(plain[0][n], plain[1][n]) for n in plain[0])  # the round trips did round
    for n in plain[0]:
        torch.testing.assert_close(plain[1][n], plain[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_carried_perturbation_guards():
    model = make_model()
    start = params_of(model)
    with pytest.raises(ValueError, match="keep_direction and carry_perturbation"):
        MeZO(param_groups_for_model(model, 0.0), lr=1e-2, carry_perturbation=True, keep_direction=True)
    ids, tgt = make_data()
    opt = MeZO(param_groups_for_model(model, 0.0), lr=0.0, eps=1e-2, carry_perturbation=True, exact_restore=True)
    saved = opt.state_dict()
    opt.step(mse(model, ids, tgt))
    assert opt.carried and not torch.equal(params_of(model)["lin1.weight"], start["lin1.weight"])
    with pytest.raises(RuntimeError, match="call settle"):
        opt.load_state_dict(saved)

    def broken():
        raise KeyError("closure failed")
    with pytest.raises(KeyError):  # a failing probe of the carried step puts θ back
        opt.step(broken)
    assert not opt.carried and all(torch.equal(p, start[n]) for n, p in params_of(model).items())
    opt.settle()  # nothing carried: a no-op
    assert all(torch.equal(p, start[n]) for n, p in params_of(model).items())


# ------------------------------------------------------------------------- fast kernels vs definition
def _train(cls, kw, dtype, use_kernels, steps=4, threads=1, nan_step=2):
    """A few steps with gradient accumulation (2 probes), one skipped (NaN) step, and a closure-less step."""
    ids, tgt = make_data()
    model = make_model(dtype=dtype)
    extra = dict(schedule=AdaMUSchedule(1, 3, 5)) if cls is ZOAdaMU else {}
    opt = cls(param_groups_for_model(model, 0.3), lr=2e-2, eps=1e-2, noise_block=NB, **extra, **kw)
    opt.fast_paths = use_kernels
    loss = mse(model, ids, tgt.to(dtype))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in range(steps):
            opt.probe(loss)
            opt.probe((lambda: torch.tensor(float("nan"))) if t == nan_step else mse(model, ids[:4], tgt[:4].to(dtype)))
            opt.step()
    finally:
        torch.set_num_threads(before)
    moms = {n: opt.state[p]["momentum"].clone() for n, p in model.named_parameters() if "momentum" in opt.state[p]}
    return params_of(model), moms, opt


FAST_CASES = [
    (MeZO, {}), (MeZO, dict(direction="rademacher")), (MeZO, dict(keep_direction=True)),
    (MeZO, dict(exact_restore=True)), (MeZO, dict(exact_restore=True, keep_direction=True, chunk_numel=3 * NB)),
    (ZOAdaMU, {}), (ZOAdaMU, dict(direction="rademacher")), (ZOAdaMU, dict(keep_direction=True)),
    (ZOAdaMU, dict(exact_restore=True)), (ZOAdaMU, dict(exact_restore=True, keep_direction=True)),
    (ZOAdaMU, dict(signed_momentum=False, chunk_numel=2 * NB)),
    (ZOAdaMU, dict(state_dtype=torch.bfloat16)), (ZOAdaMU, dict(state_dtype=torch.float16)),
]


@needs_kernels
@pytest.mark.parametrize("cls,kw", FAST_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernels_equal_the_torch_definition(cls, kw, dtype):
    """The C kernels (noise generated and applied in one pass) give bit-identical parameters and momentum to the
    unfused torch operations that define the arithmetic, on every path: probes, fused restore+update, stash,
    keep_direction, skipped steps, chunking, low-precision momentum."""
    kernels = zo_cpu.kernels_for(cls.sweep_spec())
    calls = kernels.calls
    fast_p, fast_m, fast = _train(cls, kw, dtype, True)
    # float64 weights with 16-bit state have no kernels (their state would be widened to float64): torch path
    has_kernels = kernels.supports(dtype, kw.get("state_dtype") or dtype)
    assert (kernels.calls > calls) == has_kernels, "the C kernels did not run where they exist, or ran elsewhere"
    calls = kernels.calls
    ref_p, ref_m, ref = _train(cls, kw, dtype, False)
    assert kernels.calls == calls, "the torch path called a C kernel"
    assert fast.sweeps == ref.sweeps and fast.noise_calls == ref.noise_calls
    assert int(fast.skipped_steps) == int(ref.skipped_steps) == 1
    for n in ref_p:
        assert torch.equal(fast_p[n], ref_p[n]), n
        if cls is ZOAdaMU:
            assert torch.equal(fast_m[n], ref_m[n]), n
    moved = make_model(dtype=dtype)
    assert not torch.equal(fast_p["lin1.weight"], moved.lin1.weight.detach())


@needs_kernels
@pytest.mark.parametrize("dtype,name", [(torch.float16, "f16"), (torch.bfloat16, "bf16")])
def test_kernel_half_conversions_equal_torch(dtype, name):
    """The kernels' own 16-bit state load/store (bit manipulation, vectorisable) = torch's conversions, on every
    16-bit pattern (load) and on rounding ties, subnormals, overflow and signed zeros (store)."""
    pats = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    want = pats.float()
    got = zo_cpu.convert(pats, torch.zeros(pats.numel()))
    finite = ~want.isnan()
    assert torch.equal(got.isnan(), ~finite) and torch.equal(got[finite], want[finite])
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g) * 10.0 ** torch.randint(-9, 6, (20000,), generator=g),
                   want[finite][::7],                                    # exactly representable
                   (want[finite][:-1] + want[finite][1:]) / 2,             # ties (where the mean is exact)
                   torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e10, -1e10, float("inf"), 2.0 ** -25,
                                 -(2.0 ** -25), 3 * 2.0 ** -26, 2.0 ** -24 * 1.5, 1e-40])]).float()
    x = x[x.isfinite() | x.isinf()]
    out = zo_cpu.convert(x, torch.empty(x.numel(), dtype=dtype))
    assert torch.equal(out.view(torch.int16), x.to(dtype).view(torch.int16))


@pytest.mark.parametrize("cls", [MeZO, ZOAdaMU])
def test_worker_threads_do_not_change_results(cls):
    one, mom_one, _ = _train(cls, dict(chunk_numel=NB), torch.float32, True, threads=1)
    two, mom_two, _ = _train(cls, dict(chunk_numel=NB), torch.float32, True, threads=2)
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert all(torch.equal(mom_one[n], mom_two[n]) for n in mom_one)


def test_same_seed_same_run_and_default_fp32_keeps_no_copy():
    """Reproducible from the seed (a fresh optimizer replays the run bit for bit); the fp32 default keeps no
    parameter-sized copy (no stash, no kept direction): MeZO memory."""
    a, _, opt = _train(MeZO, dict(seed=7), torch.float32, True)
    b, _, _ = _train(MeZO, dict(seed=7), torch.float32, True)
    c, _, _ = _train(MeZO, dict(seed=8), torch.float32, True)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["lin1.weight"], c["lin1.weight"])
    assert opt.memory_buffers() == {}
    _, _, keep = _train(MeZO, dict(keep_direction=True), torch.float32, True)
    # exactly one float32 copy: MeZO's one noise stream
    assert keep.memory_buffers() == {"kept noise": sum(p.numel() for gr in keep.param_groups for p in gr["params"])}


# ------------------------------------------------------------------------------------ protocol
@pytest.mark.parametrize("cls", [MeZO, ZOAdaMU])
def test_gradient_accumulation_equals_big_batch(cls):
    # fp64: in fp32 the loss difference over 2ε amplifies the round-off of the two batchings past any tight bound
    ids, tgt = make_data(n=8)
    tgt = tgt.double()
    kw = dict(lr=1e-2, eps=1e-2, noise_block=NB, **(dict(schedule=AdaMUSchedule(1, 3, 5)) if cls is ZOAdaMU else {}))
    acc, big = make_model(dtype=torch.float64), make_model(dtype=torch.float64)
    opt_a = cls(param_groups_for_model(acc, 0.1), **kw)
    opt_b = cls(param_groups_for_model(big, 0.1), **kw)
    for _ in range(4):
        for k in range(4):
            opt_a.probe(mse(acc, ids[2 * k:2 * k + 2], tgt[2 * k:2 * k + 2]))
        opt_a.step()
        opt_b.step(mse(big, ids, tgt))
        torch.testing.assert_close(opt_a.last_projected_grad, opt_b.last_projected_grad, rtol=1e-9, atol=1e-10)
    for (n, a), b in zip(acc.named_parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)


def test_probe_offsets_and_sweep_counts():
    ids, tgt = make_data()
    model = make_model()
    theta0 = params_of(model)
    opt = MeZO(param_groups_for_model(model, 0.0), lr=1e-2, eps=1e-2, noise_block=NB)
    names = ordered_names(model)
    z = {n: sample_direction(step_seed(0, 0), i, theta0[n].numel(), noise_block=NB).view_as(theta0[n])
         for i, n in enumerate(names)}
    seen = []
    opt.probe(lambda: seen.append(params_of(model)) or torch.tensor(0.0))
    assert opt.sweeps == 2
    opt.probe(lambda: seen.append(params_of(model)) or torch.tensor(0.0))
    assert opt.sweeps == 4
    for n in names:  # evaluated at θ+εz, θ-εz, θ+εz, θ-εz; resting at θ-εz
        for k, sgn in enumerate((1, -1, 1, -1)):
            torch.testing.assert_close(seen[k][n], theta0[n] + sgn * 1e-2 * z[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(model.get_parameter(n).detach(), theta0[n] - 1e-2 * z[n], rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError):
        opt.state_dict()
    opt.step()
    assert opt.sweeps == 5 and opt.step_count == 1
    with pytest.raises(RuntimeError, match="probe"):
        opt.step()


@pytest.mark.parametrize("exact", [True, False])
def test_closure_exception_restores_parameters(exact):
    model = make_model()
    theta0 = params_of(model)
    opt = MeZO(param_groups_for_model(model, 0.0), lr=1e-2, eps=1e-2, noise_block=NB, exact_restore=exact)
    calls = []

    def bad():
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")
        return torch.tensor(1.0)
    with pytest.raises(KeyError):
        opt.step(bad)
    for n, p in model.named_parameters():
        if exact:
            assert torch.equal(p, theta0[n]), n
        else:  # +ε then -ε: round-off only
            torch.testing.assert_close(p.detach(), theta0[n], rtol=0, atol=1e-6)
    assert opt.step_count == 0 and opt.sweeps == 3


def test_lr_read_at_update_time_by_scheduler():
    ids, tgt = make_data()
    model = make_model()
    theta0 = params_of(model)
    opt = MeZO(param_groups_for_model(model, 0.1), lr=1e-2, eps=1e-2, noise_block=NB, exact_restore=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s == 0 else 1.0)
    opt.step(mse(model, ids, tgt))
    assert all(torch.equal(p, theta0[n]) for n, p in model.named_parameters())
    sched.step()
    opt.step(mse(model, ids, tgt))
    assert not torch.equal(model.lin1.weight, theta0["lin1.weight"])


# ------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("cls", [MeZO, ZOAdaMU])
@pytest.mark.parametrize("dtype,exact", [(torch.float32, True), (torch.bfloat16, None)])
def test_lr0_is_bit_identical(cls, dtype, exact):
    """fp32 with exact_restore=True and bf16 with the default (auto) stash: 50 steps at lr=0 change nothing."""
    ids, tgt = make_data()
    model = make_model(dtype=dtype)
    theta0 = params_of(model)
    opt = cls(param_groups_for_model(model, 0.3), lr=0.0, eps=1e-3, noise_block=NB, exact_restore=exact)
    for _ in range(50):
        opt.step(mse(model, ids, tgt))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), theta0[n]), n


def test_lr0_default_fp32_drift_is_roundoff():
    """Without a stash (fp32 default) the +ε/-2ε/+ε round trip drifts by round-off only."""
    ids, tgt = make_data()
    model = make_model()
    theta0 = params_of(model)
    opt = MeZO(param_groups_for_model(model, 0.3), lr=0.0, eps=1e-3, noise_block=NB)
    for _ in range(50):
        opt.step(mse(model, ids, tgt))
    for n, p in model.named_parameters():
        # each step: 3 roundings at magnitude <= |θ| + 2ε|u| (|u| < 6), half an ulp each
        ulp = 2.0 ** -23 * (theta0[n].abs().max().item() + 2e-3 * 6)
        assert (p.detach() - theta0[n]).abs().max().item() <= 50 * 1.5 * ulp, n


@pytest.mark.parametrize("cls", [MeZO, ZOAdaMU])
def test_nonfinite_loss_skips_update(cls):
    ids, tgt = make_data()
    model = make_model()
    opt = cls(param_groups_for_model(model, 0.3), lr=1e-2, eps=1e-2, noise_block=NB, exact_restore=True,
              **(dict(schedule=AdaMUSchedule(1, 3, 5)) if cls is ZOAdaMU else {}))
    for _ in range(2):
        opt.step(mse(model, ids, tgt))
    before = params_of(model)
    moms = {n: opt.state[p].get("momentum") for n, p in model.named_parameters()}
    moms = {n: (m.clone() if m is not None else None) for n, m in moms.items()}
    calls = []
    opt.step(lambda: torch.tensor(float("nan")) if calls.append(1) or len(calls) == 1 else torch.tensor(1.0))
    assert int(opt.skipped_steps) == 1 and opt.step_count == 3
    assert not bool(torch.isfinite(opt.last_projected_grad))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        if cls is ZOAdaMU:
            assert torch.equal(opt.state[p]["momentum"], moms[n]), n
    opt.step(mse(model, ids, tgt))  # training goes on
    assert int(opt.skipped_steps) == 1 and not torch.equal(model.lin1.weight, before["lin1.weight"])


@pytest.mark.parametrize("cls,lr", [(MeZO, 0.5), (ZOAdaMU, 0.2)])
def test_loss_falls_on_least_squares(cls, lr):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 50, generator=g) / math.sqrt(50)
    y = X @ torch.randn(50, generator=g)
    w = nn.Parameter(torch.zeros(50))
    loss = lambda: ((X @ w - y) ** 2).mean()  # noqa: E731
    kw = dict(schedule=AdaMUSchedule.for_max_steps(400)) if cls is ZOAdaMU else {}
    opt = cls([w], lr=lr, eps=1e-3, seed=1, **kw)
    with torch.no_grad():
        start = float(loss())
        for _ in range(400):
            opt.step(loss)
        assert float(loss()) < 0.15 * start


# ------------------------------------------------------------------------------------ state
@pytest.mark.parametrize("cls,kw", [(MeZO, {}), (ZOAdaMU, dict(schedule=AdaMUSchedule(1, 4, 6))),
                                    (ZOAdaMU, dict(schedule=AdaMUSchedule(1, 4, 6), state_dtype=torch.bfloat16))])
def test_state_dict_resume_is_bit_identical(cls, kw):
    ids, tgt = make_data()

    def build(model):
        return cls(param_groups_for_model(model, 0.1), lr=1e-2, eps=1e-2, noise_block=NB, seed=5, **kw)
    model = make_model()
    opt = build(model)
    for _ in range(3):
        opt.step(mse(model, ids, tgt))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    for _ in range(3):
        opt.step(mse(model, ids, tgt))
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model2 = make_model(seed=99)
    model2.load_state_dict(ckpt["model"])
    opt2 = build(model2)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.step_count == 3
    for _ in range(3):
        opt2.step(mse(model2, ids, tgt))
    assert opt2.step_count == 6
    for (n, a), b in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(a, b), n
        if cls is ZOAdaMU:
            m2 = opt2.state[b]["momentum"]
            assert m2.dtype == (kw.get("state_dtype") or torch.float32)
            assert torch.equal(opt.state[a]["momentum"], m2)


def test_loading_other_optimizer_state_raises():
    model = make_model()
    mezo = MeZO(param_groups_for_model(model, 0.1), lr=1e-2, noise_block=NB)
    adamu = ZOAdaMU(param_groups_for_model(model, 0.1), lr=1e-2, noise_block=NB)
    with pytest.raises(ValueError, match="made with optimizer mezo, this run uses zo_adamu"):
        adamu.load_state_dict(mezo.state_dict())
    sgd = torch.optim.SGD(param_groups_for_model(model, 0.1), lr=0.1)
    with pytest.raises(ValueError, match="not a ZO optimizer"):
        mezo.load_state_dict(sgd.state_dict())


def test_only_trainable_tensors_get_state_and_move():
    ids, tgt = make_data()
    model = make_model()
    model.lin1.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    groups = param_groups_for_model(model, 0.1)
    late = model.lin2.bias  # given to the optimizer, then frozen: also left alone
    opt = ZOAdaMU(groups, lr=1e-2, eps=1e-2, noise_block=NB, schedule=AdaMUSchedule(1, 3, 5))
    late.requires_grad_(False)
    late0 = late.detach().clone()
    for _ in range(3):
        opt.step(mse(model, ids, tgt))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]) and "momentum" not in opt.state.get(p, {})
    assert torch.equal(late, late0) and "momentum" not in opt.state[late]
    trainable = [p for gr in groups for p in gr["params"] if p is not late]
    assert all(opt.state[p]["momentum"].shape == p.shape for p in trainable)
    assert sum("momentum" in s for s in opt.state.values()) == len(trainable)


# ------------------------------------------------------------------------------------ schedule & validation
@pytest.mark.parametrize("t,expect", [
    (0, (1, 1, 1)), (1024, (1, 1, 1)), (4000, (0.942, 0.946, 0.939)), (8000, (0.677, 0.724, 0.646)),
    (12000, (0.283, 0.411, 0.202)), (14000, (0.110, 0.259, 0.037)), (16000, (0.010, 0.131, 0.012)),
    (19999, (0.010, 0.131, 0.012)), (50000, (0.010, 0.131, 0.012)),
])
def test_schedule_reference_values(t, expect):
    got = AdaMUSchedule().values(t)
    assert [round(v, 3) for v in got] == pytest.approx(list(expect), abs=1e-9)


def test_schedule_options_and_errors():
    s = AdaMUSchedule(alpha_floor=0.5)
    assert s.values(12000)[0] == pytest.approx(0.283, abs=5e-4) and s.values(16000)[0] == 0.5
    assert AdaMUSchedule.for_max_steps(20000) == AdaMUSchedule()
    small = AdaMUSchedule.for_max_steps(100)
    assert (small.T1, small.T2, small.T3) == (5, 80, 100)
    assert AdaMUSchedule.for_max_steps(5).T1 >= 1
    assert anneal(10, 5, 80, 100, 1.0) == pytest.approx(small.values(10)[0])
    with pytest.raises(ValueError, match="T1=16000, T2=16000"):
        AdaMUSchedule(T1=16000, T2=16000)
    with pytest.raises(ValueError, match="T2=16000, T3=15000"):
        AdaMUSchedule(T3=15000)
    with pytest.raises(ValueError, match="phi_beta2=1.5"):
        AdaMUSchedule(T3=100000)  # the paper caption's 100K steps: the φ=1.5 denominator crosses 0
    with pytest.raises(ValueError, match="alpha_floor"):
        AdaMUSchedule(alpha_floor=1.5)


@pytest.mark.parametrize("kw,match", [
    (dict(eps=0.0), "eps"), (dict(eps=-1e-3), "eps"), (dict(lr=-1.0), "learning rate"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(direction="uniform"), "direction"),
    (dict(seed=-1), "seed"), (dict(chunk_numel=24), "chunk_numel"), (dict(noise_block=0), "noise_block"),
])
def test_hyperparameter_validation(kw, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        MeZO(model.parameters(), **{"lr": 1e-3, "noise_block": NB, **kw})


def test_group_and_state_dtype_validation():
    model = make_model()
    with pytest.raises(ValueError, match="share eps"):
        MeZO([{"params": [model.lin1.weight]}, {"params": [model.lin2.weight], "eps": 0.1}], lr=1e-3)
    with pytest.raises(ValueError, match="state_dtype"):
        ZOAdaMU(model.parameters(), state_dtype=torch.int8)
