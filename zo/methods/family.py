"""Element-wise ZO methods on the core protocol of zo.core.ZOOptimizer: MeZO, the ZO-Bench family (ZO-SGD-Sign,
-MMT, -Cons, ZO-Adam), HiZOO and FZOO.  Each is one rule (the C and Triton sweeps come from the core); what goes beyond one
two-point probe (a forward at θ, a candidate update, several directions) uses the core's public calls: center_loss,
probe_one_sided, apply_update / restore / finish_step, several directions per step.

Symbols: θ the trainable weights, z the noise of a direction (Gaussian, or ±1 with --zo_direction rademacher), ε the
perturbation scale, g = (ℓ+ - ℓ-)/(2ε) the projected gradient, η the learning rate (--learning_rate), λ the weight
decay (decoupled: θ·(1-ηλ), applied by the core; every method here defaults to λ = 0 as its authors' scripts do).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from zo import rule as zo_rule
from zo.core import NOISE_BLOCK, Rule, ZOOptimizer
from zo.hparams import Hyper, shared

__all__ = ["ModeDefault", "MeZO", "ZOSGDSign", "ZOSGDMMT", "ZOSGDCons", "ZOAdam", "HiZOO", "FZOO"]

class ModeDefault(NamedTuple):
    """The (LR, ε) a method starts from in one training mode, and where the values come from (a paper's table, the
    authors' script, or "ours, because ...")."""
    lr: float
    eps: float
    source: str



# MeZO's recommended (LR, ε) per mode for OPT-13B (its large-model README grids; the top LR of each), also the
# starting point of a method whose authors publish none for a mode (borrowed() says so in the source).
MEZO_PAPER = {
    "ft": ModeDefault(1e-6, 1e-3, "MeZO README grid LR {1e-6, 1e-7}, ε 1e-3; its author calls 1e-6 generally best"),
    "lora": ModeDefault(1e-4, 1e-2, "MeZO README LoRA grid LR {1e-4, 5e-5}, ε 1e-2: its top"),
    "prefix": ModeDefault(1e-2, 1e-1, "MeZO README prefix grid LR {1e-2, 1e-3}, ε 1e-1: its top"),
}


def borrowed(defaults: dict, who: str) -> dict:
    """`defaults` restated as the starting point of a method whose authors publish no value for those modes."""
    return {mode: d._replace(source=f"borrowed, as {who} publish none for this mode: {d.source}")
            for mode, d in defaults.items()}


def _f64(value, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), float(value), dtype=torch.float64, device=like.device)


class MeZO(ZOOptimizer):
    """ZO-SGD (MeZO): u = z ~ N(0, I) (or ±1), θ <- θ - lr·(g·z + λθ)."""

    name = "mezo"
    title = "MeZO"
    streams = ("z",)
    update_values = ("coef",)
    mode_defaults = MEZO_PAPER

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, **kw):
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    @staticmethod
    def rule(noise, state, s):
        return Rule(direction=noise.z, step=noise.z * s.coef)

    def values_from_g(self, g, group):
        return {"coef": -(g * group["lr"])}


def zo_bench(method: str, lora: tuple, prefix: tuple) -> dict:
    """ZO-Bench publishes LR / ε grids per method and mode (zo-bench/sweeps/SST2_opt-1.3b: OPT-1.3B on SST2), not the
    values it picked: our default is MeZO's value where the method's grid holds it, else the grid's top.  `lora` and
    `prefix`: (LR, ε, the grid as the sweep files give it).  No full-parameter grids were published for these
    methods: MeZO's value, borrowed."""
    defaults = {"ft": borrowed(MEZO_PAPER, "ZO-Bench's sweeps")["ft"]}
    for mode, (lr, eps, grid) in (("lora", lora), ("prefix", prefix)):
        picked = "MeZO's value, in it" if (lr, eps) == MEZO_PAPER[mode][:2] else "its top"
        defaults[mode] = ModeDefault(lr, eps, f"ZO-Bench sweeps SST2_opt-1.3b, {method}, {mode} grid {grid}: {picked}")
    return defaults


class ZOSGDSign(MeZO):
    """ZO-SGD-Sign (ZO-Bench, Zhang et al. ICML 2024, after signSGD; Liu et al. 2019), as the paper states it: the
    sign of the ZO gradient estimate ĝ = g·z, element by element:   θ <- θ - η·sign(g·z) = θ - η·sign(g)·sign(z).
    No state.  Where the authors' code (ZO-Bench/ZO-LLM zo-bench/trainer.py, zo_step) departs: it writes sign(g)·z
    (not sign(g·z); the paper's form is commented out as "signOpt_mul_sign") into .grad and steps whatever optimizer
    the run was given, and none of its published sweeps passes --optimizer, so their ZO-SGD-Sign runs stepped
    Hugging Face's default AdamW on sign(g)·z: an Adam-like method, not signSGD.  We follow the paper."""

    name, title = "zo_sgd_sign", "ZO-SGD-Sign"
    mode_defaults = zo_bench("trainer zo_sign_opt", (1e-4, 1e-2, "LR {1e-3 .. 1e-6}, ε {1e-2, 1e-3, 1e-4}"),
                             (1e-2, 1e-1, "LR {1e-2, 1e-3, 1e-4}, ε 1e-1"))

    @staticmethod
    def rule(noise, state, s):
        return Rule(direction=noise.z, step=zo_rule.sign(noise.z) * s.coef)

    def values_from_g(self, g, group):
        return {"coef": -group["lr"] * torch.sign(g)}


class ZOSGDMMT(ZOOptimizer):
    """ZO-SGD-MMT (ZO-Bench): heavy-ball momentum on the ZO gradient estimate, as torch.optim.SGD(momentum=μ,
    dampening=0) does in the authors' code:   b <- μ·b + g·z,  θ <- θ - η·b   (b = 0 before the first step, so the
    first b is g·z, torch's first step).  μ = 0.9 (the authors' sweeps).  State: b, one buffer."""

    name, title = "zo_sgd_mmt", "ZO-SGD-MMT"
    streams = ("z",)
    buffers = ("momentum_buffer",)
    step_values = ("mu",)
    update_values = ("g", "neg_lr")
    mode_defaults = zo_bench("trainer zo_sgd, momentum 0.9", (1e-4, 1e-2, "LR {1e-3 .. 1e-6}, ε {1e-2, 1e-3, 1e-4}"),
                             (1e-2, 1e-1, "LR {1e-2, 1e-3, 1e-4}, ε 1e-1"))
    hyperparameters = (Hyper("mu", 0.9, "momentum of the ZO gradient estimate (ZO-Bench's sweeps: 0.9)", symbol="μ",
                             low=0.0, high=0.999999),)

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, **kw):
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    @staticmethod
    def rule(noise, state, s):
        b = state.momentum_buffer * s.mu + noise.z * s.g
        return Rule(direction=noise.z, step=b * s.neg_lr, state={"momentum_buffer": b})

    def values_at(self, t):
        return {"mu": self.mu}

    def values_from_g(self, g, group):
        return {"g": g, "neg_lr": _f64(-group["lr"], g)}


class ZOAdam(ZOOptimizer):
    """ZO-Adam (ZO-Bench): Adam on the ZO gradient estimate ĝ = g·z, as torch.optim.Adam in the authors' code:
        m <- β1·m + (1-β1)·ĝ,  v <- β2·v + (1-β2)·ĝ²,
        θ <- θ - η/(1-β1^n) · m / (√v/√(1-β2^n) + ϵ),   n = 1, 2, ... the updates applied so far, this one included
    β1 = 0.9, β2 = 0.999, ϵ = 1e-8 (torch's defaults, which the authors keep).  n counts applied updates as torch's
    Adam counts its own step() calls: a step skipped for a non-finite loss neither moves m, v nor advances n (it is
    step count minus skipped steps, read on the device: no host synchronisation).  The authors' code never skips (a
    non-finite loss reaches Adam as a non-finite gradient); skipping is this suite's rule for every method.  Their
    Adam has no weight decay; ours is the core's decoupled λ (0 by default, so the two agree).  State: m and v, two
    buffers."""

    name, title = "zo_adam", "ZO-Adam"
    streams = ("z",)
    buffers = ("exp_avg", "exp_avg_sq")
    step_values = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "adam_eps")
    update_values = ("g", "step_size", "sqrt_bc2")
    mode_defaults = zo_bench("trainer zo_adam", (1e-4, 1e-2, "LR {1e-4, 1e-5, 1e-6}, ε {1e-2 .. 1e-5}"),
                             (1e-4, 1e-3, "LR {1e-4 .. 1e-8}, ε {1e-3, 1e-4, 1e-5}"))
    hyperparameters = (
        shared("beta1", 0.9),
        Hyper("beta2", 0.999, "second-moment decay (torch's 0.999, which ZO-Bench keeps)", symbol="β2", low=0.0,
              high=0.999999),
        Hyper("adam_eps", 1e-8, "Adam's denominator epsilon, not the perturbation scale --zo_eps (torch's 1e-8)",
              symbol="ϵ", above=0.0))

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, **kw):
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    @staticmethod
    def rule(noise, state, s):
        gz = noise.z * s.g
        m = state.exp_avg * s.beta1 + gz * s.one_minus_beta1
        v = state.exp_avg_sq * s.beta2 + gz * gz * s.one_minus_beta2
        step = m / (zo_rule.sqrt(v) / s.sqrt_bc2 + s.adam_eps) * s.step_size
        return Rule(direction=noise.z, step=step, state={"exp_avg": m, "exp_avg_sq": v})

    def values_at(self, t):
        return {"beta1": self.beta1, "one_minus_beta1": 1.0 - self.beta1, "beta2": self.beta2,
                "one_minus_beta2": 1.0 - self.beta2, "adam_eps": self.adam_eps}

    def values_from_g(self, g, group):
        n = (self.step_count - self.skipped_steps).to(g.device, torch.float64) + 1   # this update, if applied
        bc1 = 1.0 - torch.pow(_f64(self.beta1, g), n)
        sqrt_bc2 = torch.sqrt(1.0 - torch.pow(_f64(self.beta2, g), n))
        return {"g": g, "step_size": -group["lr"] / bc1, "sqrt_bc2": sqrt_bc2}


class ZOSGDCons(MeZO):
    """ZO-SGD-Cons (ZO-Bench, "conservative"), as the paper states it: after the two-point probe, the SGD candidates
    θ - η·g·z and θ + η·g·z are evaluated on the same batch and the step goes to the lowest of L(θ), L(θ-ηgz),
    L(θ+ηgz); a candidate is taken only where its loss is strictly below L(θ), so a step never raises the probe loss.
    Ties go to θ, then to θ-ηgz.  The candidates carry the core's decoupled weight decay λ (0 by default).  5 forward
    passes a step: L(θ), ℓ+, ℓ-, and the two candidates.
    Where the authors' code (zo-bench/trainer.py, zo_conserv_step) departs: its candidates are optimizer steps on
    ±ĝ, and as none of its published sweeps passes --optimizer that optimizer is Hugging Face's default AdamW (so the
    candidates are Adam steps, with AdamW's own weight decay, and going from θ-ηĝ to θ+ηĝ is a third Adam step, not an
    exact reflection); ties keep θ+ηĝ, and L(θ-ηĝ) = L(θ) accepts θ-ηĝ.
    Exactness: every candidate is built from a stash of θ (exact_restore is on for every tensor: +1 x params), and a
    rejection copies the stash back, so a rejected step leaves θ bit for bit; the accepted candidate is the evaluated
    weights bit for bit.  One probe per step (the candidates are judged on its batch; ZO-Bench refuses gradient
    accumulation too) and one direction."""

    name, title = "zo_sgd_cons", "ZO-SGD-Cons"
    forwards = 5
    max_directions = 1   # the candidates are judged along the one probed direction
    mode_defaults = zo_bench("trainer zo_conserv", (1e-4, 1e-2, "LR {1e-4 .. 1e-7}, ε {1e-2, 1e-3, 1e-4}"),
                             (1e-3, 1e-2, "LR {1e-3 .. 1e-6}, ε {1e-2, 1e-3, 1e-4}"))

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, exact_restore=None, **kw):
        if kw.get("carry_perturbation"):
            raise ValueError("ZO-SGD-Cons ends a step at θ or at a judged candidate, never at the next step's "
                             "perturbation: drop carry_perturbation")
        if exact_restore is False or kw.get("probe_mode", "inplace") != "inplace":
            raise ValueError("ZO-SGD-Cons rejects a candidate by returning to a stash of θ, so it needs "
                             "exact_restore (--zo_exact_restore auto or always), not never, and in-place probes "
                             "(--zo_probe inplace: forward-time probes keep no stash)")
        self._sign, self.last_choice = 1.0, None
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block,
                         exact_restore=True, **kw)

    @classmethod
    def memory(cls):
        return f"{cls.title}: +1 x trainable params (a stash of θ, in the parameter dtype, for exact rejection)"

    def values_from_g(self, g, group):
        return {"coef": -(g * group["lr"]) * self._sign}

    @torch.no_grad()
    def probe(self, closure, direction: int = 0):
        self.check_direction(direction)
        if self.probes:
            raise ValueError("ZO-SGD-Cons judges its candidates on the batch of its one probe: one probe of direction "
                             "0 per step (use --gradient_accumulation_steps 1)")
        l0 = self.center_loss(closure)
        lp, lm = super().probe(closure)
        g = self.measured_directions()[0]
        losses = [(l0, 0.0)]
        try:
            for sign in (1.0, -1.0):   # θ - ηgz, then θ + ηgz, each from the stash
                self._sign = sign
                ok = self.apply_update(g)
                losses.append((torch.as_tensor(closure()).detach().to(l0.dtype), sign))
        except BaseException:
            self.restore()   # every tensor is stashed: a copy back to θ
            self.abort()
            raise
        self._judged = (g, ok)
        if bool(ok):
            best = min(losses, key=lambda pair: float(pair[0]))   # first of equals: θ, then θ - ηgz
            choice = best[1] if float(best[0]) < float(l0) else 0.0
        else:
            choice = 0.0
        if choice == 0.0:
            self.restore()
        elif choice == 1.0:
            self._sign = 1.0
            self.apply_update(g)   # the same sweep as the evaluated candidate: the same weights bit for bit
        self.last_choice = choice
        self.last_candidate_losses = [float(x) for x, _ in losses]
        return lp, lm

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            self.probe(closure)
        if not self.measurements():
            raise RuntimeError("step() needs a closure or a probe() in this step")
        g, ok = self._judged
        self.finish_step(~ok, g)
        return self.last_loss_plus


class HiZOO(ZOOptimizer):
    """HiZOO (Zhao et al., ICLR 2025): a diagonal Hessian estimate Σ (1 at the start) shapes the perturbation.
        probes at θ ± ε·z/√Σ and L(θ):  ℓ+, ℓ-, ℓ0 (3 forward passes),  g = (ℓ+ - ℓ-)/(2ε)
        Σ <- (1-α)·Σ + α·|ℓ+ + ℓ- - 2ℓ0|/(2ε²) · Σ·z²
        θ <- θ - η·(g·z/√Σ_new + λθ)
    as the authors' code (Yanjun-Zhao/HiZOO trainer.py, zo_Hessian_step_update) computes it: the update uses the new
    Σ, the probes the old one.  The paper writes the preconditioner as Σ^{1/2} with Σ an inverse-Hessian estimate; the
    code keeps the Hessian estimate and divides by its root, the same thing for a diagonal; we follow the code.
    Departures from the code: its fourth forward after the update (only logged) is not made; it evaluates α and the LR
    once per epoch, we take them constant; its weight decay reaches every trainable parameter while ours, the suite's
    parameter groups, exempts biases and normalisation weights (no difference at λ = 0, the default here and in the
    authors' scripts).  α (--zo_alpha): the code's default schedule is "constant0" (α = 0: Σ stays 1 and HiZOO is
    MeZO with a wasted forward); its README's example uses 1e-8, our default.  Σ stays positive: α ∈ [0, 1), the
    estimate is ≥ 0, and a step with a non-finite loss is skipped whole.  State: Σ, one buffer."""

    name, title = "hizoo", "HiZOO"
    forwards = 3
    max_directions = 1   # the paper updates Σ once a step, from one direction's curvature
    streams = ("z",)
    buffers = ("hessian",)
    buffer_init = {"hessian": 1.0}
    step_values = ("one_minus_alpha",)
    update_values = ("alpha_h", "coef")
    mode_defaults = {**borrowed(MEZO_PAPER, "HiZOO's authors"),
                     "ft": ModeDefault(1e-6, 1e-3, "HiZOO's README example (OPT, full parameters)")}
    hyperparameters = (Hyper("alpha", 1e-8, "smoothing of the Hessian EMA (the authors' README example; their code "
                                            "defaults to 0, which makes HiZOO MeZO with an extra forward)",
                             symbol="α", low=0.0, high=0.999999),)

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, **kw):
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    @staticmethod
    def rule(noise, state, s):
        sigma = state.hessian
        new = sigma * s.one_minus_alpha + sigma * noise.z * noise.z * s.alpha_h
        return Rule(direction=noise.z / zo_rule.sqrt(sigma), step=noise.z / zo_rule.sqrt(new) * s.coef,
                    state={"hessian": new})

    def values_at(self, t):
        return {"one_minus_alpha": 1.0 - self.alpha}

    @torch.no_grad()
    def probe(self, closure, direction: int = 0):
        self.center_loss(closure)
        return super().probe(closure, direction)

    def values_from_g(self, g, group):
        _, lp, lm, n = self.measurements()[self.direction]
        l0 = self.center()
        eps = group["eps"]
        h = (lp / n + lm / n - 2 * l0).abs().to(torch.float64) / (2 * eps * eps)
        return {"alpha_h": h * self.alpha, "coef": -(g * group["lr"])}


class FZOO(MeZO):
    """FZOO (Dang et al., arXiv 2506.09034, ICLR 2026): N one-sided estimates per step on one batch, with Rademacher
    directions u_i, and the step normalised by the spread of the losses:
        ℓ0 = L(θ),  ℓ_i = L(θ + ε·u_i),  g_i = (ℓ_i - ℓ0)/ε,  σ = std(ℓ_1 .. ℓ_N)  (unbiased),
        θ <- θ - η/σ · (1/N)·Σ_i g_i·u_i     (N+1 forward passes a step)
    Direction i is the core's direction i of the step (seed zo.noise.direction_seed), applied by the core's
    several-direction update (each with η/N) with coef -η/N·g_i/σ.  A step whose σ is 0 or not finite is skipped.
    We follow the paper.  The authors' code (DKmiyan/FZOO trainer.py) departs in two constants: its σ is the
    population std (N in the denominator, not N-1: σ smaller by √((N-1)/N), 0.935 at N = 8), and its step
    lr·Σ_i (ℓ_i - ℓ0)/(N·σ)·u_i has no 1/ε, so its LR is our η/ε; it also measures ℓ0 after the N probes (the same θ).
    N = 8 as theirs (run.py, fzoo.sh).  Defaults: their fzoo.sh's LR 1e-5 (for every mode) converted to η = 1e-5·ε."""

    name, title = "fzoo", "FZOO"
    forwards = 9
    default_directions, min_directions = 8, 2   # σ is the spread of the directions' losses
    forwards_per_direction = 1                  # one-sided probes around one shared ℓ0
    forwards_note = "N+1 (9 at the default N = 8)"
    mode_defaults = {mode: ModeDefault(1e-5 * d.eps, d.eps, f"FZOO's fzoo.sh: LR 1e-5 in its code's units (no 1/ε), "
                                                            f"η = 1e-5·ε; ε: MeZO's for the mode ({d.source})")
                     for mode, d in MEZO_PAPER.items()}

    def __init__(self, params, lr=1e-9, eps=1e-3, weight_decay=0.0, seed=0, direction="rademacher",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, num_directions=None, **kw):
        num_directions = self.default_directions if num_directions is None else num_directions
        if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 2:
            raise ValueError(f"Invalid FZOO num_directions={num_directions!r}: need an int >= 2 (σ is the spread of "
                             "their losses)")
        self.num_directions = num_directions
        self.forwards = num_directions + 1
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    @torch.no_grad()
    def probe(self, closure, direction: int | None = None):
        """ℓ0 and the one-sided probes of every direction (or of `direction`) on one batch; returns (mean ℓ_i, ℓ0)."""
        directions = range(self.num_directions) if direction is None else [direction]
        return self.probe_directions(closure, directions), self.center()

    @torch.no_grad()
    def probe_directions(self, closure, directions):
        """ℓ0 once, then the one-sided probe of each direction (direction parallelism: a rank's share of them, each
        rank measuring the same ℓ0 on the same batch); returns the mean ℓ_i."""
        l0 = self.center_loss(closure)
        for q in directions:
            self.probe_one_sided(closure, q, l0)
        measured = self.measurements()
        return torch.stack([measured[q][1] / measured[q][3] for q in directions]).mean()

    def sigma(self) -> torch.Tensor:
        """σ of this step's measured directions (a pure function of them: the same value at every call)."""
        # in direction order: ranks that probed different directions first must sum in the same order
        losses = torch.stack([lp / n for _, lp, _, n in self.measurements().values()]).to(torch.float64)
        return losses.std()

    def finite(self, g):
        sigma = self.sigma()
        return super().finite(g) & torch.isfinite(sigma) & (sigma > 0)

    def values_from_g(self, g, group):
        return {"coef": -(g * group["lr"]) / self.sigma()}
