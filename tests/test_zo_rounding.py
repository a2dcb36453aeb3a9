"""16-bit updates that do not vanish (issue 22, item 3).  An update of a bf16 weight near 0.02 by ~1e-6 is below half an
ulp (6e-5) and rounds away: every update sweep counts the share of such elements (last_rounded_away, logged as
update_rounded_away), and --zo_stochastic_rounding rounds the updated value at random instead, from bits of the step
seed: unbiased, reproducible, bit-identical on resume, and the same bits on every path (C kernels, Triton's
interpreter, torch)."""
import copy
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import args
import zo
from conftest import ROOT, tiny_model
from zo import noise as zo_noise
from zo.backends import cpu as zo_cpu
from zo.methods.adamu import AdaMUSchedule, ZOAdaMU
from zo.methods.family import MeZO
from zo.methods.lowrank import LOZO

needs_kernels = pytest.mark.skipif(not zo.kernels_available(), reason="no C compiler: only the torch path exists")
HALF = [torch.bfloat16, torch.float16]
SEED = zo.step_seed(3, 0)


def stored(value: float, dtype) -> float:
    """`value` as dtype stores it."""
    return torch.tensor([value]).to(dtype).item()


def ulp_above(value: float, dtype) -> float:
    """The gap from `value` (representable in dtype) to the next value away from zero."""
    x = torch.tensor([value], dtype=dtype)
    bits = x.view(torch.int16) + 1
    return abs(bits.view(dtype).float().item() - value)


# ------------------------------------------------------------------------------- the rounding itself
@pytest.mark.parametrize("dtype,value", [(torch.bfloat16, 0.02), (torch.bfloat16, -0.02), (torch.float16, 0.02),
                                         (torch.float16, 3 * 2.0 ** -24)])   # the last: a float16 subnormal
def test_stochastic_rounding_is_unbiased_at_a_tenth_of_an_ulp(dtype, value):
    """100,000 elements each 0.1 ulp above a 16-bit value: to nearest nothing moves (the mean change is 0, the
    vanishing update); stochastically each moves one ulp with probability 0.1, so the mean change must be 0.1 ulp
    within 5 standard errors (SE = ulp·sqrt(0.1·0.9/n) = 0.00095 ulp: tolerance 0.0047 ulp)."""
    value = stored(value, dtype)
    n, ulp = 100_000, ulp_above(value, dtype)
    d = math.copysign(0.1 * ulp, value)
    v = torch.full((n,), value + d, dtype=torch.float32)
    assert torch.equal(v.to(dtype).float(), torch.full((n,), value)), "to nearest, the update should vanish"
    bits = zo_noise.rounding_bits(zo_noise.counter_key(SEED, 0, zo_noise.ROUNDING_STREAM), 0, n, "cpu")
    got = zo_noise.stochastic_round(v, bits, dtype).float()
    assert set(got.unique().tolist()) <= {value, value + math.copysign(ulp, value)}, "not a neighbour"
    mean = (got - value).mean().item() / math.copysign(ulp, value)
    assert abs(mean - 0.1) < 5 * math.sqrt(0.1 * 0.9 / n), mean


def test_exact_values_nan_and_overflow_are_kept():
    bits = torch.tensor([0, 0xFFFFFFFF, 0x80000000, 12345, 0xFFFFFFFF, 7], dtype=torch.int64)
    v = torch.tensor([0.5, -0.25, 0.0, float("nan"), float("inf"), -2.0 ** -10], dtype=torch.float32)
    for dtype in HALF:
        got = zo_noise.stochastic_round(v, bits, dtype).float()
        want = v.to(dtype).float()   # every one is representable (or NaN / inf): rounding adds nothing
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])


# ------------------------------------------------------------------------------- in a step
def probe_losses():
    """A closure whose two probes see losses 1 then 0, so g = 1/(2ε) whatever the weights."""
    state = {"n": 0}

    def closure():
        state["n"] += 1
        return torch.tensor(1.0 if state["n"] % 2 else 0.0)
    return closure


def one_step(values: torch.Tensor, *, lr, stochastic, fast=True, eps=1e-2, **kw):
    p = nn.Parameter(values.clone())
    opt = MeZO([{"params": [p], "weight_decay": 0.0}], lr=lr, eps=eps, seed=3, stochastic_rounding=stochastic, **kw)
    opt.fast_paths = fast
    opt.step(probe_losses())
    return p.detach(), opt


@pytest.mark.parametrize("fast", [True, False])
def test_a_step_of_a_tenth_of_an_ulp_moves_the_weights_on_average(fast):
    """bf16 weights of 0.02 (ulp 1.22e-4) and an update lr·g·u = 1e-5·u: to nearest every element rounds away
    (update_rounded_away = 1, but for the few that float32 already rounds away) and the weights do not move.
    Stochastically, S = Σ(θ'-θ)·u must equal its expectation Σ d·u, d = -1e-5·u the intended update, within 5
    standard errors, sqrt(Σ u²·ulp²·p(1-p)), p = |d|/ulp; to nearest S = 0 is ~50 of them away.  S is taken over
    the elements moving up and those moving down apart: a scheme that rounds one side too often and the other too
    rarely would balance in one sum."""
    n = 100_000
    theta = torch.full((n,), 0.02, dtype=torch.bfloat16)
    ulp = ulp_above(theta[0].item(), torch.bfloat16)
    lr = 1e-5 / 50.0   # g = 1/(2ε) = 50
    u = zo.sample_direction(SEED, 0, n)
    d = -(lr * 50.0) * u
    p_up = (d.abs() / ulp).double()
    sides = {"down": u > 0, "up": u < 0}
    se = {k: torch.sqrt((u.double() ** 2 * ulp ** 2 * p_up * (1 - p_up))[m].sum()).item() for k, m in sides.items()}
    expected = {k: (d.double() * u.double())[m].sum().item() for k, m in sides.items()}
    nearest, opt = one_step(theta, lr=lr, stochastic=False, fast=fast)
    coef = (-(opt.last_projected_grad.double() * lr)).float()
    changed = (theta.float() + u * coef != theta.float()).double().mean().item()   # not those below float32's ulp
    assert torch.equal(nearest, theta) and opt.last_rounded_away.item() == changed > 0.999
    assert all(abs(0.0 - expected[k]) > 20 * se[k] for k in sides)   # the vanishing is what the test can see
    rounded, opt = one_step(theta, lr=lr, stochastic=True, fast=fast)
    moved = (rounded.double() - theta.double()) * u.double()
    for side, mask in sides.items():
        s = moved[mask].sum().item()
        assert abs(s - expected[side]) < 5 * se[side], (side, s, expected[side], se[side])
    # stochastically, an element still rounds to nothing with probability 1 - p
    assert abs(opt.last_rounded_away.item() - (1 - p_up).mean().item()) < 0.01


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
def test_the_rounded_away_share_is_that_of_a_constructed_case(dtype):
    """Weights spread over four decades and one update: the share is the fraction of elements whose float32 new
    value differs from the old one but rounds back to it, computed here independently; float32 weights are not
    counted (None); a skipped step rounds nothing away."""
    n = 4096
    theta = (torch.randn(n, generator=torch.Generator().manual_seed(0)) * 10.0 ** torch.arange(n).remainder(4).sub(3)
             ).to(dtype)
    lr = 2e-5
    _, opt = one_step(theta, lr=lr, stochastic=False)
    if dtype == torch.float32:
        assert opt.last_rounded_away is None
        return
    coef = (-(opt.last_projected_grad.double() * lr)).float()   # the sweep's scalar, rounded once
    z = theta.float() + zo.sample_direction(SEED, 0, n) * coef
    away = (z != theta.float()) & (z.to(dtype) == theta)
    assert 0.02 < away.double().mean() < 0.98, "a case with both kinds"
    assert opt.last_rounded_away.item() == away.double().mean().item()
    p = nn.Parameter(theta.clone())
    skip = MeZO([p], lr=lr, eps=1e-2)
    skip.step(lambda: torch.tensor(float("nan")))
    assert skip.last_rounded_away.item() == 0.0 and int(skip.skipped_steps) == 1


# ------------------------------------------------------------------------------- reproducible, one definition
def train(dtype, *, stochastic=True, fast=True, seed=0, cls=MeZO, steps=4, shares=True, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.LayerNorm(40), nn.Linear(40, 3)).to(dtype)
    x, y = torch.randn(8, 12), torch.randn(8, 3)
    extra = dict(schedule=AdaMUSchedule(1, 3, 4)) if cls is ZOAdaMU else {}
    opt = cls(zo.param_groups_for_model(model, 0.1), lr=1e-3, eps=1e-2, seed=seed, stochastic_rounding=stochastic,
              noise_block=64, **extra, **kw)
    opt.fast_paths = fast
    found = []
    for t in range(steps):
        opt.step(lambda: ((model(x.to(dtype)).float() - y) ** 2).mean() * (float("nan") if t == 2 else 1.0))
        found.append(opt.last_rounded_away.item() if shares else opt.last_rounded_away)
    opt.settle()
    return [p.detach().clone() for p in model.parameters()], found, opt


@pytest.mark.parametrize("dtype", HALF)
def test_same_seed_same_weights_another_seed_other_weights(dtype):
    a, share_a, _ = train(dtype, seed=5)
    b, share_b, _ = train(dtype, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and share_a == share_b
    c, _, _ = train(dtype, seed=6)
    nearest, _, _ = train(dtype, seed=5, stochastic=False)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not all(torch.equal(x, y) for x, y in zip(a, nearest))


def test_float32_weights_are_left_alone():
    """The flag has no effect on float32 weights (nothing counted either)."""
    with_flag, shares, _ = train(torch.float32, stochastic=True, shares=False)
    without, _, _ = train(torch.float32, stochastic=False, shares=False)
    assert all(torch.equal(x, y) for x, y in zip(with_flag, without)) and shares == [None] * 4


CASES = [(MeZO, {}), (MeZO, dict(exact_restore=False)), (MeZO, dict(keep_direction=True, chunk_numel=128)),
         (MeZO, dict(direction="rademacher")), (ZOAdaMU, {})]


@needs_kernels
@pytest.mark.parametrize("cls,kw", CASES)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("dtype", HALF)
def test_the_c_kernels_equal_the_torch_path(dtype, stochastic, cls, kw):
    """16-bit weights now have C kernels too: weights, state and rounded-away shares bit for bit."""
    kernels = zo_cpu.kernels_for(cls.sweep_spec())
    calls = kernels.calls
    fast, fast_shares, fast_opt = train(dtype, stochastic=stochastic, cls=cls, **kw)
    assert kernels.calls > calls, "the C kernels did not run"
    calls = kernels.calls
    ref, ref_shares, ref_opt = train(dtype, stochastic=stochastic, fast=False, cls=cls, **kw)
    assert kernels.calls == calls, "the torch path called a C kernel"
    assert all(torch.equal(a, b) for a, b in zip(fast, ref)) and fast_shares == ref_shares
    assert fast_shares[2] == 0.0 and max(fast_shares) < 1.0   # step 2 is skipped
    assert dtype != torch.bfloat16 or max(fast_shares) > 0.0   # in bf16 some do round away: the count is compared
    for p, q in zip(fast_opt.param_groups[0]["params"], ref_opt.param_groups[0]["params"]):
        if "momentum" in fast_opt.state[p]:
            assert torch.equal(fast_opt.state[p]["momentum"], ref_opt.state[q]["momentum"])


# ------------------------------------------------------------------------------- Triton's interpreter
TRITON_CHECK = """
import json, sys, torch
sys.path[:0] = [{tests!r}, {root!r}]
from zo.backends import triton as kernels
kernels.allow_cpu = True
launches, original = [], kernels.DeviceSweeps.sweep
kernels.DeviceSweeps.sweep = lambda *a, **kw: launches.append(kw) or original(*a, **kw)
import test_zo_rounding as t
found = {{}}
for dtype, stochastic, carry in [(torch.bfloat16, True, False), (torch.float16, True, True),
                                 (torch.bfloat16, False, True), (torch.float16, False, False)]:
    launches.clear()
    fused, fused_shares, _ = t.train(dtype, stochastic=stochastic, carry_perturbation=carry)
    ran = any(kw["stochastic"] == stochastic and kw["count"] for kw in launches)
    launches.clear()
    ref, ref_shares, _ = t.train(dtype, stochastic=stochastic, fast=False, carry_perturbation=carry)
    found[f"{{dtype}} {{stochastic}} {{carry}}"] = dict(
        ran=ran, torch_launched=bool(launches), shares=fused_shares == ref_shares,
        equal=all(torch.equal(a, b) for a, b in zip(fused, ref)))
print(json.dumps(found))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_triton_kernels_equal_the_torch_path():
    """In Triton's interpreter on CPU tensors (TRITON_INTERPRET=1 before triton is imported: a subprocess), the fused
    updates round stochastically and count what rounds away exactly as the torch path, carried perturbation too."""
    script = TRITON_CHECK.format(tests=str(ROOT / "tests"), root=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found) == 4 and all(case == dict(ran=True, torch_launched=False, shares=True, equal=True)
                                   for case in found.values()), found


# ------------------------------------------------------------------------------- flags, trainer, resume
TRAIN = ["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0", "--max_steps", "100"]


def test_the_flag_is_off_by_default_and_part_of_the_run_identity_only_when_on(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    off = args.parse(TRAIN + ["--load_bfloat16"])
    on = args.parse(TRAIN + ["--load_bfloat16", "--zo_stochastic_rounding"])
    assert "zo_stochastic_rounding" not in off.identity() and on.identity()["zo_stochastic_rounding"] is True
    assert off.run_id() != on.run_id()
    import report
    import runs
    assert "sr" in runs.describe(on).split("-") and "sr" not in runs.describe(off).split("-")
    assert report.defaults_left_out()["zo_stochastic_rounding"] is False   # old results group with new ones
    assert "stochastic_rounding" not in off.zo.optimizer_kwargs(100)
    assert on.zo.optimizer_kwargs(100)["stochastic_rounding"] is True
    with pytest.raises(args.UsageError, match="--zo_stochastic_rounding rounds updates of 16-bit weights"):
        args.parse(TRAIN + ["--zo_stochastic_rounding"])
    with pytest.raises(args.UsageError, match="zo_optim lozo: LOZO writes its low-rank updates itself"):
        args.parse(TRAIN + ["--load_float16", "--zo_stochastic_rounding", "--zo_optim", "lozo"])
    with pytest.raises(ValueError, match="low-rank updates itself"):
        LOZO(nn.Linear(4, 4).parameters(), stochastic_rounding=True)


def make_trainer(model, folder, steps=6, save=False, stochastic=True):
    from transformers import TrainingArguments
    from args import ZOArguments
    from test_trainer_zo import records
    from trainer_zo import TaskEval, ZOTrainer
    from utils import ListDataset, Objective, TrainCollator
    targs = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=8, max_steps=steps,
                              learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1,
                              save_strategy="steps" if save else "no", save_steps=3, report_to="none",
                              remove_unused_columns=False, seed=0, use_cpu=True, max_grad_norm=0.0,
                              disable_tqdm=True)
    return ZOTrainer(model=model, args=targs, train_dataset=ListDataset(records()), data_collator=TrainCollator(258),
                     objective=Objective(), task_eval=TaskEval(None, [], None, None, None),
                     zo_args=ZOArguments(zo_optim="mezo", zo_eps=1e-3, zo_stochastic_rounding=stochastic))


def test_the_log_reports_it_and_a_resumed_run_is_bit_identical(tmp_path):
    from test_trainer_zo import StopAfter
    base = tiny_model("llama", dtype=torch.bfloat16)
    straight, resumed = copy.deepcopy(base), copy.deepcopy(base)
    trainer = make_trainer(straight, tmp_path / "straight")
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all(0.0 <= e["update_rounded_away"] <= 1.0 for e in logged)
    nearest = copy.deepcopy(base)
    make_trainer(nearest, tmp_path / "nearest", stochastic=False).train()
    assert not all(torch.equal(a, b) for a, b in zip(straight.parameters(), nearest.parameters()))
    interrupted = make_trainer(copy.deepcopy(base), tmp_path / "run", save=True)
    interrupted.add_callback(StopAfter(3))
    interrupted.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    make_trainer(resumed, tmp_path / "run", save=True).train(resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
