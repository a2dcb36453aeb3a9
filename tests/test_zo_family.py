"""The ZO optimizer family, each against a dense reference written here from the same seeds (fp64, a few steps on a
tiny model), plus what each method promises: fast paths equal the torch path bit for bit, state round-trips through
a checkpoint, low-rank directions have their rank and come back from the seed, HiZOO's Σ stays positive, Cons never
takes a step that raised the loss, several directions (and directions measured elsewhere) apply as one average."""
import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import zo
from zo import registry as zo_methods
from zo import noise as zo_noise
from zo.methods.family import FZOO, HiZOO, MeZO, ZOAdam, ZOSGDCons, ZOSGDMMT, ZOSGDSign
from zo.methods.lowrank import LOZO, LOZOM, SubZero

LR, EPS = 1e-2, 1e-3


def tiny(dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    x, y = torch.randn(8, 5, dtype=dtype), torch.randn(8, 3, dtype=dtype)
    names = [n for n, _ in model.named_parameters()]
    return model, names, (lambda: ((model(x) - y) ** 2).mean()), (
        lambda params: ((functional_call(model, dict(zip(names, params)), (x,)) - y) ** 2).mean())


def noise(t, index, p, q=0, direction="gaussian"):
    seed = zo_noise.direction_seed(0, t, q)
    return zo_noise.sample_direction(seed, index, p.numel(), direction=direction).to(p.dtype).view_as(p)


def run(cls, steps=3, dtype=torch.float64, fast=True, **kw):
    model, _, loss, _ = tiny(dtype)
    opt = cls(list(model.parameters()), lr=kw.pop("lr", LR), eps=kw.pop("eps", EPS), exact_restore=True, **kw)
    opt.fast_paths = fast
    for _ in range(steps):
        opt.step(loss)
    return model, opt


def start():
    return [p.detach().clone() for p in tiny()[0].parameters()]


def assert_params(model, want, rtol=1e-9):
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=rtol, atol=1e-12)


def two_point(f, th, zs, eps=EPS):
    lp = f([t + eps * z for t, z in zip(th, zs)])
    lm = f([t - eps * z for t, z in zip(th, zs)])
    return float((lp - lm) / (2 * eps)), lp, lm


# ------------------------------------------------------------------------------------------ dense references
def test_sign_mmt_adam_follow_their_formulas():
    f = tiny()[3]
    for cls, kw in ((ZOSGDSign, {}), (ZOSGDMMT, {"mu": 0.8}), (ZOAdam, {"beta1": 0.8, "beta2": 0.9})):
        model, _ = run(cls, steps=3, **kw)
        th, b, m, v = start(), None, None, None
        for t in range(3):
            zs = [noise(t, i, p) for i, p in enumerate(th)]
            g, _, _ = two_point(f, th, zs)
            if cls is ZOSGDSign:
                th = [p - LR * math.copysign(1.0, g) * torch.sign(z) for p, z in zip(th, zs)]
            elif cls is ZOSGDMMT:
                b = [g * z if b is None else 0.8 * bb + g * z for bb, z in zip(b or zs, zs)]
                th = [p - LR * bb for p, bb in zip(th, b)]
            else:
                m = [0.2 * g * z if m is None else 0.8 * mm + 0.2 * g * z for mm, z in zip(m or zs, zs)]
                v = [0.1 * (g * z) ** 2 if v is None else 0.9 * vv + 0.1 * (g * z) ** 2 for vv, z in zip(v or zs, zs)]
                th = [p - LR / (1 - 0.8 ** (t + 1)) * mm / (vv.sqrt() / math.sqrt(1 - 0.9 ** (t + 1)) + 1e-8)
                      for p, mm, vv in zip(th, m, v)]
        assert_params(model, th)


def test_hizoo_follows_the_authors_update_and_keeps_sigma_positive():
    f = tiny()[3]
    alpha = 0.3
    model, opt = run(HiZOO, steps=3, alpha=alpha)
    th = start()
    sig = [torch.ones_like(p) for p in th]
    for t in range(3):
        zs = [noise(t, i, p) for i, p in enumerate(th)]
        l0 = f(th)
        g, lp, lm = two_point(f, th, [z / s.sqrt() for z, s in zip(zs, sig)])
        h = abs(float(lp + lm - 2 * l0)) / (2 * EPS ** 2)
        sig = [(1 - alpha) * s + alpha * h * s * z * z for s, z in zip(sig, zs)]
        th = [p - LR * g * z / s.sqrt() for p, z, s in zip(th, zs, sig)]
    assert_params(model, th)
    for p, s in zip(model.parameters(), sig):
        torch.testing.assert_close(opt.state[p]["hessian"], s.view(-1).view_as(p), rtol=1e-9, atol=0)
    assert opt.forwards == 3


def test_hizoo_sigma_stays_positive_and_finite_through_a_non_finite_loss():
    model, _, loss, _ = tiny()
    opt = HiZOO(list(model.parameters()), lr=LR, eps=EPS, alpha=0.5)
    for t in range(6):
        opt.step((lambda: torch.tensor(float("inf"))) if t == 2 else loss)
        for p in model.parameters():
            s = opt.state[p]["hessian"]
            assert torch.isfinite(s).all() and (s > 0).all()
    assert int(opt.skipped_steps) == 1


def test_fzoo_is_the_normalised_mean_of_one_sided_rademacher_estimates():
    f = tiny()[3]
    n = 3
    model, opt = run(FZOO, steps=2, num_directions=n, lr=1e-3)
    assert opt.forwards == 4 and opt.param_groups[0]["direction"] == "rademacher"
    th = start()
    for t in range(2):
        l0 = f(th)
        zs = [[noise(t, i, p, q, "rademacher") for i, p in enumerate(th)] for q in range(n)]
        ls = torch.stack([f([p + EPS * z for p, z in zip(th, zq)]) for zq in zs])
        sigma = float(ls.std())
        for q in range(n):   # each direction's update in turn, with η/N
            g = float((ls[q] - l0) / EPS)
            th = [p - 1e-3 / n * g / sigma * z for p, z in zip(th, zs[q])]
    assert_params(model, th)


def test_cons_takes_the_best_candidate_and_never_raises_the_loss():
    model, names, loss, f = tiny()
    opt = ZOSGDCons(list(model.parameters()), lr=0.5, eps=EPS)   # a large step: rejections happen
    assert opt.forwards == 5
    choices = set()
    for t in range(12):
        before = [p.detach().clone() for p in model.parameters()]
        l0 = float(loss().detach())
        opt.step(loss)
        after = float(loss().detach())
        assert after <= l0
        choices.add(opt.last_choice)
        zs = [noise(t, i, p) for i, p in enumerate(before)]
        g, _, _ = two_point(f, before, zs)
        cands = {0.0: before, 1.0: [p - 0.5 * g * z for p, z in zip(before, zs)],
                 -1.0: [p + 0.5 * g * z for p, z in zip(before, zs)]}
        if opt.last_choice == 0.0:   # a rejection is exact: θ bit for bit
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        else:
            assert opt.last_candidate_losses[int(opt.last_choice == -1.0) + 1] < l0
            assert_params(model, cands[opt.last_choice])
    assert 0.0 in choices and choices - {0.0}, f"the test should see rejections and acceptances, saw {choices}"


def test_lozo_directions_have_rank_r_and_come_back_from_the_seed():
    model, names, loss, f = tiny()
    r, nu = 2, 2
    opt = LOZO(list(model.parameters()), lr=LR, eps=EPS, rank=r, interval=nu, exact_restore=True)
    for t in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        seen = []   # the weights at each probe: θ + εd, then θ - εd
        opt.probe(lambda: seen.append([p.detach().clone() for p in model.parameters()]) or loss())
        d = [(a - b) / EPS for a, b in zip(seen[0], before)]
        for i, (p, di) in enumerate(zip(before, d)):
            if p.dim() == 2:
                m, n = p.shape
                u = zo_noise.counter_noise(zo_noise.counter_key(zo_noise.step_seed(0, t), i, 0), 0, m * r,
                                           "gaussian", "cpu").view(m, r).double()
                v = zo_noise.counter_noise(zo_noise.counter_key(zo_noise.step_seed(0, t - t % nu), i, 1), 0, n * r,
                                           "gaussian", "cpu").view(n, r).double()
                assert torch.linalg.matrix_rank(di, rtol=1e-8) == r
                torch.testing.assert_close(di, u @ v.T, rtol=1e-6, atol=1e-9)
            else:
                torch.testing.assert_close(di, noise(t, i, p), rtol=1e-6, atol=1e-9)
        opt.step()
        g = float(opt.last_projected_grad)
        assert_params(model, [b - LR * g * di for b, di in zip(before, d)], rtol=1e-6)


def test_lozo_m_keeps_momentum_in_factor_space_and_carries_it_into_a_new_basis():
    model, names, loss, f = tiny()
    r, nu, beta = 2, 2, 0.5
    opt = LOZOM(list(model.parameters()), lr=LR, eps=EPS, rank=r, interval=nu, beta=beta, exact_restore=True)
    th, mom = start(), {}
    for t in range(5):
        dirs, factors = [], {}
        for i, p in enumerate(th):
            if p.dim() == 2:
                m, n = p.shape
                u = zo_noise.counter_noise(zo_noise.counter_key(zo_noise.step_seed(0, t), i, 0), 0, m * r,
                                           "gaussian", "cpu").view(m, r).double()
                v = lambda s: zo_noise.counter_noise(zo_noise.counter_key(zo_noise.step_seed(0, s - s % nu), i, 1),
                                                     0, n * r, "gaussian", "cpu").view(n, r).double()
                factors[i] = (u, v(t), v(t - 1) if t else None)
                dirs.append(u @ v(t).T)
            else:
                dirs.append(noise(t, i, p))
        g, _, _ = two_point(f, th, dirs)
        new = []
        for i, (p, d) in enumerate(zip(th, dirs)):
            if i in factors:
                u, v, v_old = factors[i]
                if t == 0:
                    mom[i] = g * u
                else:
                    old = mom[i] @ (v_old.T @ v) / v.shape[0] if t % nu == 0 else mom[i]
                    mom[i] = beta * old + (1 - beta) * g * u
                new.append(p - LR * mom[i] @ v.T)
            else:
                mom[i] = g * d if t == 0 else beta * mom[i] + (1 - beta) * g * d
                new.append(p - LR * mom[i])
        th = new
        opt.step(loss)
    assert_params(model, th, rtol=1e-7)
    assert {k for p in model.parameters() for k in opt.state[p]} >= {"factor_momentum", "momentum"}


def test_subzero_directions_are_u_z_vt_of_rank_r_from_the_seed():
    model, _, loss, _ = tiny()
    r, T = 2, 3
    opt = SubZero(list(model.parameters()), lr=LR, eps=EPS, rank=r, interval=T, exact_restore=True)
    for t in range(4):
        before = [p.detach().clone() for p in model.parameters()]
        seen = []
        opt.probe(lambda: seen.append([p.detach().clone() for p in model.parameters()]) or loss())
        for i, (a, b) in enumerate(zip(seen[0], before)):
            d = (a - b) / EPS
            if b.dim() != 2:
                continue
            m, n = b.shape
            refresh = zo_noise.step_seed(0, t - t % T)
            draw = lambda seed, stream, k: zo_noise.counter_noise(zo_noise.counter_key(seed, i, stream), 0, k,
                                                                  "gaussian", "cpu")
            u = torch.linalg.qr(draw(refresh, 1, m * r).view(m, r))[0]
            v = torch.linalg.qr(draw(refresh, 2, n * r).view(n, r))[0]
            core = draw(zo_noise.step_seed(0, t), 0, r * r).view(r, r)
            want = (u @ core * (math.sqrt(m * n) / r)).double() @ v.double().T
            assert torch.linalg.matrix_rank(d, rtol=1e-8) == r
            torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-7)
        opt.step()


# ------------------------------------------------------------------------------------------ several directions
def test_several_directions_apply_the_average_and_remote_ones_count_the_same():
    f = tiny()[3]
    q = 4
    model, _, loss, _ = tiny()
    opt = MeZO(list(model.parameters()), lr=LR, eps=EPS, exact_restore=True)
    for d in range(q):
        opt.probe(loss, direction=d)
    opt.step()
    th = start()
    step = [torch.zeros_like(p) for p in th]
    for d in range(q):
        zs = [noise(0, i, p, d) for i, p in enumerate(th)]
        g, _, _ = two_point(f, th, zs)
        step = [s + LR / q * g * z for s, z in zip(step, zs)]
    assert_params(model, [p - s for p, s in zip(th, step)])
    # two "ranks" probing two directions each and exchanging (direction, g) pairs end where the one process did
    ranks = [tiny() for _ in range(2)]
    opts = [MeZO(list(m.parameters()), lr=LR, eps=EPS, exact_restore=True) for m, *_ in ranks]
    for r, (o, (m, _, loss_r, _)) in enumerate(zip(opts, ranks)):
        for d in (2 * r, 2 * r + 1):
            o.probe(loss_r, direction=d)
    measured = [o.measured_directions() for o in opts]
    for r, o in enumerate(opts):
        for d, g in measured[1 - r].items():
            o.record_direction(d, g)
        o.step()
    for m, _, _, _ in ranks:
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), model.parameters()))


def test_direction_zero_is_the_step_seed_so_one_direction_is_unchanged():
    assert zo_noise.direction_seed(7, 3, 0) == zo_noise.step_seed(7, 3)
    assert len({zo_noise.direction_seed(7, 3, q) for q in range(5)}) == 5
    with pytest.raises(ValueError, match="non-negative int"):
        zo_noise.direction_seed(7, 3, -1)


# ------------------------------------------------------------------------------------------ every optimizer
@pytest.mark.skipif(not zo.kernels_available(), reason="no C compiler: only the torch path exists")
@pytest.mark.parametrize("name", sorted(zo_methods.OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_paths_equal_the_torch_path_bit_for_bit(name, dtype):
    cls = zo_methods.OPTIMIZERS[name]
    kw = {"num_directions": 3} if name == "fzoo" else {}
    fast, _ = run(cls, steps=3, dtype=dtype, fast=True, lr=1e-3, **kw)
    ref, _ = run(cls, steps=3, dtype=dtype, fast=False, lr=1e-3, **kw)
    moved = [not torch.equal(a, b.to(dtype)) for a, b in zip(fast.parameters(), start())]
    assert all(torch.equal(a, b) for a, b in zip(fast.parameters(), ref.parameters()))
    assert all(moved)


@pytest.mark.parametrize("name", sorted(zo_methods.OPTIMIZERS))
def test_checkpoint_round_trip_resumes_bit_for_bit_and_another_optimizer_is_refused(name):
    cls = zo_methods.OPTIMIZERS[name]
    kw = dict(num_directions=3) if name == "fzoo" else dict(interval=2) if name in ("lozo", "lozo_m", "subzero") else {}
    whole, _ = run(cls, steps=4, dtype=torch.float32, lr=1e-3, **kw)
    model, _, loss, _ = tiny(torch.float32)
    opt = cls(list(model.parameters()), lr=1e-3, eps=EPS, exact_restore=True, **kw)
    for _ in range(2):
        opt.step(loss)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    del opt
    model, _, loss, _ = tiny(torch.float32)
    model.load_state_dict(weights)
    resumed = cls(list(model.parameters()), lr=1e-3, eps=EPS, exact_restore=True, **kw)
    resumed.load_state_dict(saved)
    assert resumed.step_count == 2
    for _ in range(2):
        resumed.step(loss)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), whole.parameters()))
    other = ZOAdam if cls is not ZOAdam else MeZO
    with pytest.raises(ValueError, match=f"made with optimizer {name}"):
        other(list(model.parameters()), lr=1e-3).load_state_dict(saved)


def test_every_optimizer_declares_forwards_memory_and_defaults():
    for name, cls in zo_methods.OPTIMIZERS.items():
        assert isinstance(cls.forwards, int) and cls.forwards >= 2, name
        assert cls.memory().startswith(cls.title + ":"), name
        assert set(cls.mode_defaults) == set(zo_methods.MODES), name
        for mode in zo_methods.MODES:   # every default says where it comes from
            assert len(zo_methods.default_source(name, mode)) > 20, (name, mode)
        assert name in zo_methods.describe(name)
    with pytest.raises(ValueError, match="choose from mezo, zo_adamu, "):
        zo_methods.get("zo_sgd")


def test_zo_adam_bias_correction_counts_applied_updates_not_skipped_steps():
    """torch's Adam counts its own step() calls; a ZO step skipped for a non-finite loss is no update, so the first
    applied update after it is Adam's first step: lr·ĝ/(|ĝ|+ϵ) per element, whatever came before."""
    f = tiny()[3]
    model, _, loss, _ = tiny()
    opt = ZOAdam(list(model.parameters()), lr=LR, eps=EPS, exact_restore=True)
    opt.step(lambda: torch.tensor(float("nan")))
    assert int(opt.skipped_steps) == 1 and opt.step_count == 1
    assert_params(model, start())
    opt.step(loss)
    th = start()
    zs = [noise(1, i, p) for i, p in enumerate(th)]
    g, _, _ = two_point(f, th, zs)
    want = [p - LR * (0.1 * g * z / 0.1) / ((0.001 * (g * z) ** 2).sqrt() / math.sqrt(0.001) + 1e-8)
            for p, z in zip(th, zs)]
    assert_params(model, want)


@pytest.mark.parametrize("name", ["zo_adamu", "zo_sgd_mmt", "zo_adam", "lozo_m", "hizoo", "zo_sgd_cons"])
def test_methods_with_state_refuse_a_second_direction(name):
    """Q directions a step apply one after another: a method whose direction or update reads its state would probe
    direction q with the state before the step and update it from the state that direction q-1 wrote (ZO-AdaMU), or
    advance its momentum Q times a step (MMT, Adam, LOZO-M).  Such a method takes one direction, here and remotely."""
    cls = zo_methods.get(name)
    assert cls.direction_bound()[0] == 1 and name not in zo_methods.taking_several_directions()
    model, _, loss, _ = tiny()
    opt = cls(list(model.parameters()), lr=LR, eps=EPS, exact_restore=True)
    with pytest.raises(ValueError, match="direction 1 refused"):
        opt.probe(loss, direction=1)
    with pytest.raises(ValueError, match="direction 1 refused"):
        opt.record_direction(1, torch.tensor(0.5))
    assert set(zo_methods.taking_several_directions()) == {"mezo", "zo_sgd_sign", "lozo", "subzero", "fzoo"}



def test_mezo_starts_from_its_papers_values_in_every_mode():
    """MeZO's large-model README grids (OPT-13B): full parameters LR {1e-6, 1e-7} ε 1e-3, prefix {1e-2, 1e-3} ε 1e-1,
    LoRA {1e-4, 5e-5} ε 1e-2; the default is each grid's top, and the methods that borrow MeZO's values get the same."""
    want = {"ft": (1e-6, 1e-3), "lora": (1e-4, 1e-2), "prefix": (1e-2, 1e-1)}
    for mode, values in want.items():
        assert zo_methods.mode_defaults("mezo", mode) == values
        for name in ("hizoo", "lozo", "subzero"):
            if "borrowed" in zo_methods.default_source(name, mode):
                assert zo_methods.mode_defaults(name, mode) == values, (name, mode)
    assert "MeZO README" in zo_methods.default_source("mezo", "lora")
