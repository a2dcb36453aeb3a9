"""Element-wise ZO methods on the core protocol of zo.ZOOptimizer: MeZO, the ZO-Bench family (ZO-SGD-Sign, -MMT, -Cons,
ZO-Adam), HiZOO and FZOO.  Each is one rule (the C and Triton sweeps come from the core); what goes beyond one
two-point probe (a forward at θ, a candidate update, several directions) uses the core's general hooks: center_loss,
probe_one_sided, several directions per step.

Symbols: θ the trainable weights, z the noise of a direction (Gaussian, or ±1 with --zo_direction rademacher), ε the
perturbation scale, g = (ℓ+ - ℓ-)/(2ε) the projected gradient, η the learning rate (--learning_rate), λ the weight
decay (decoupled: θ·(1-ηλ), applied by the core; every method here defaults to λ = 0 as its authors' scripts do).
"""
from __future__ import annotations

import math

import torch

import zo_rule
from zo import NOISE_BLOCK, Rule, ZOOptimizer

__all__ = ["MeZO", "ZOSGDSign", "ZOSGDMMT", "ZOSGDCons", "ZOAdam", "HiZOO", "FZOO"]

# The values of MeZO's paper per mode (LR, ε): the starting point where a method's authors publish none for a mode.
MEZO_PAPER = {"ft": (1e-6, 1e-3), "lora": (1e-4, 1e-2), "prefix": (1e-2, 1e-1)}


def _f64(value, like: torch.Tensor) -> torch.Tensor:
    return torch.full((), float(value), dtype=torch.float64, device=like.device)


class MeZO(ZOOptimizer):
    """ZO-SGD (MeZO): u = z ~ N(0, I) (or ±1), θ <- θ - lr·(g·z + λθ)."""

    name = "mezo"
    title = "MeZO"
    streams = ("z",)
    update_values = ("coef",)
    # mezo.sh's long-standing defaults (the same for every mode)
    mode_defaults = {"ft": (1e-5, 1e-3), "lora": (1e-5, 1e-3), "prefix": (1e-5, 1e-3)}

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, **kw):
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    @staticmethod
    def rule(noise, state, s):
        return Rule(direction=noise.z, step=noise.z * s.coef)

    def values_from_g(self, g, group):
        return {"coef": -(g * group["lr"])}


# ZO-Bench publishes LR/ε grids per mode (zo-bench/sweeps), not single values: our defaults are points of those grids.
ZO_BENCH = {"ft": (1e-6, 1e-3), "lora": (1e-4, 1e-2), "prefix": (1e-5, 1e-3)}


class ZOSGDSign(MeZO):
    """ZO-SGD-Sign (ZO-Bench, Zhang et al. ICML 2024, after signSGD; Liu et al. 2019): the sign of the ZO gradient
    estimate ĝ = g·z, element by element:   θ <- θ - η·sign(g·z) = θ - η·sign(g)·sign(z).
    The authors' code (zo-bench/trainer.py, "signOpt_orig") steps along sign(g)·z instead (MeZO with |g| replaced by
    1), and keeps the paper's form commented out ("signOpt_mul_sign"); we follow the paper.  No state."""

    name, title = "zo_sgd_sign", "ZO-SGD-Sign"
    mode_defaults = ZO_BENCH

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
    mode_defaults = {**ZO_BENCH, "prefix": (1e-4, 1e-3)}

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, mu=0.9, **kw):
        if not 0.0 <= mu < 1.0:
            raise ValueError(f"Invalid momentum mu={mu}: need 0 <= mu < 1 (ZO-Bench uses 0.9)")
        self.mu = float(mu)
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
        θ <- θ - η/(1-β1^t) · m / (√v/√(1-β2^t) + ϵ),   t = 1, 2, ... (steps, not directions)
    β1 = 0.9, β2 = 0.999, ϵ = 1e-8 (torch's defaults, which the authors keep).  Their Adam has no weight decay; ours is
    the core's decoupled λ (0 by default, so the two agree).  State: m and v, two buffers."""

    name, title = "zo_adam", "ZO-Adam"
    streams = ("z",)
    buffers = ("exp_avg", "exp_avg_sq")
    step_values = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "sqrt_bc2", "adam_eps")
    update_values = ("g", "step_size")
    mode_defaults = ZO_BENCH

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, beta1=0.9, beta2=0.999, adam_eps=1e-8, **kw):
        for name, b in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid {name}={b}: need 0 <= {name} < 1 (Adam's defaults: 0.9, 0.999)")
        if not adam_eps > 0:
            raise ValueError(f"Invalid adam_eps={adam_eps}: need > 0 (it keeps the denominator away from 0)")
        self.beta1, self.beta2, self.adam_eps = float(beta1), float(beta2), float(adam_eps)
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
                "one_minus_beta2": 1.0 - self.beta2, "sqrt_bc2": math.sqrt(1.0 - self.beta2 ** (t + 1)),
                "adam_eps": self.adam_eps}

    def values_from_g(self, g, group):
        bc1 = 1.0 - self.beta1 ** (self.step_count + 1)
        return {"g": g, "step_size": _f64(-group["lr"] / bc1, g)}


class ZOSGDCons(MeZO):
    """ZO-SGD-Cons (ZO-Bench, "conservative"): after the two-point probe, the candidates θ - η·g·z and θ + η·g·z are
    evaluated on the same batch and the step goes to the lowest of L(θ), L(θ-ηgz), L(θ+ηgz) (weight decay included in
    the candidates, as in the authors' update_params); a candidate is taken only where its loss is strictly below
    L(θ), so a step never raises the probe loss.  Ties go to θ, then to θ-ηgz (the authors' code breaks some ties
    toward θ+ηgz).  5 forward passes a step: L(θ), ℓ+, ℓ-, and the two candidates.
    Exactness: every candidate is built from a stash of θ (exact_restore is on for every tensor: +1 x params), and a
    rejection copies the stash back, so a rejected step leaves θ bit for bit; the accepted candidate is the evaluated
    weights bit for bit.  One probe per step (the candidates are judged on its batch; ZO-Bench refuses gradient
    accumulation too) and one direction."""

    name, title = "zo_sgd_cons", "ZO-SGD-Cons"
    forwards = 5
    max_directions = 1   # the candidates are judged along the one probed direction
    mode_defaults = ZO_BENCH

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, exact_restore=None, **kw):
        if kw.get("carry_perturbation"):
            raise ValueError("ZO-SGD-Cons ends a step at θ or at a judged candidate, never at the next step's "
                             "perturbation: drop carry_perturbation")
        if exact_restore is False:
            raise ValueError("ZO-SGD-Cons rejects a candidate by returning to a stash of θ, so it needs "
                             "exact_restore (--zo_exact_restore auto or always), not never")
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
        if self._n_probes or direction != 0:
            raise ValueError("ZO-SGD-Cons judges its candidates on the batch of its one probe: one probe of direction "
                             "0 per step (use --gradient_accumulation_steps 1)")
        l0 = self.center_loss(closure)
        lp, lm = super().probe(closure)
        g = self.measured_directions()[0]
        self._g, self._ok = g, self._finite(g)
        losses = [(l0, 0.0)]
        try:
            for sign in (1.0, -1.0):   # θ - ηgz, then θ + ηgz, each from the stash
                self._sign, self._update_cache = sign, {}
                self._sweep("update")
                self._offset = 0
                losses.append((torch.as_tensor(closure()).detach().to(l0.dtype), sign))
        except BaseException:
            self._sweep("restore", -1)   # every tensor is stashed: a copy back to θ
            self._reset_step()
            raise
        if bool(self._ok):
            best = min(losses, key=lambda pair: float(pair[0]))   # first of equals: θ, then θ - ηgz
            choice = best[1] if float(best[0]) < float(l0) else 0.0
        else:
            choice = 0.0
        if choice == 0.0:
            self._sweep("restore", -1)
        elif choice == 1.0:
            self._sign, self._update_cache = 1.0, {}
            self._sweep("update")   # the same sweep as the evaluated candidate: the same weights bit for bit
        self.last_choice = choice
        self.last_candidate_losses = [float(x) for x, _ in losses]
        return lp, lm

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            self.probe(closure)
        if not self._measured:
            raise RuntimeError("step() needs a closure or a probe() in this step")
        self._finish_step(self.step_count, ~self._ok, self._g)
        return self.last_loss_plus


class HiZOO(ZOOptimizer):
    """HiZOO (Zhao et al., ICLR 2025): a diagonal Hessian estimate Σ (1 at the start) shapes the perturbation.
        probes at θ ± ε·z/√Σ and L(θ):  ℓ+, ℓ-, ℓ0 (3 forward passes),  g = (ℓ+ - ℓ-)/(2ε)
        Σ <- (1-α)·Σ + α·|ℓ+ + ℓ- - 2ℓ0|/(2ε²) · Σ·z²
        θ <- θ - η·(g·z/√Σ_new + λθ)
    as the authors' code (trainer.py, zo_Hessian_step_update) computes it: the update uses the new Σ, the probes the
    old one.  The paper writes the preconditioner as Σ^{1/2} with Σ an inverse-Hessian estimate; the code keeps the
    Hessian estimate and divides by its root, the same thing for a diagonal; we follow the code.  The code's extra
    forward after the update (only logged) is not made.  α (--zo_hizoo_alpha): the code's default schedule is
    "constant0" (α = 0: Σ stays 1 and HiZOO is MeZO with a wasted forward); its README's example uses 1e-8, our
    default.  Σ stays positive: α ∈ [0, 1), the estimate is ≥ 0, and a step with a non-finite loss is skipped whole.
    State: Σ, one buffer."""

    name, title = "hizoo", "HiZOO"
    forwards = 3
    max_directions = 1   # the paper updates Σ once a step, from one direction's curvature
    streams = ("z",)
    buffers = ("hessian",)
    buffer_init = {"hessian": 1.0}
    step_values = ("one_minus_alpha",)
    update_values = ("alpha_h", "coef")
    mode_defaults = {**MEZO_PAPER, "ft": (1e-6, 1e-3)}   # ft: the authors' README; others: MeZO's

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, alpha=1e-8, **kw):
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"Invalid HiZOO smoothing alpha={alpha}: need 0 <= alpha < 1 (the authors use 1e-8)")
        self.alpha = float(alpha)
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
        _, lp, lm, n = self._measured[self._direction]
        l0 = self._center[0] / self._center[1]
        eps = group["eps"]
        h = (lp / n + lm / n - 2 * l0).abs().to(torch.float64) / (2 * eps * eps)
        return {"alpha_h": h * self.alpha, "coef": -(g * group["lr"])}


class FZOO(MeZO):
    """FZOO (Dang et al., arXiv 2506.09034, ICLR 2026): N one-sided estimates per step on one batch, with Rademacher
    directions u_i, and the step normalised by the spread of the losses:
        ℓ0 = L(θ),  ℓ_i = L(θ + ε·u_i),  g_i = (ℓ_i - ℓ0)/ε,  σ = std(ℓ_1 .. ℓ_N)  (unbiased),
        θ <- θ - η/σ · (1/N)·Σ_i g_i·u_i     (N+1 forward passes a step)
    Direction i is the core's direction i of the step (seed zo_noise.direction_seed), applied by the core's
    several-direction update (each with η/N) with coef -η/N·g_i/σ.  A step whose σ is 0 or not finite is skipped.
    The authors' repository (dkmiyan/FZOO) was not reachable here; the formula is the paper's as summarised in its
    abstract and by third parties, and N = 8 and the LR defaults (MeZO's LR times ε, which gives the normalised step a
    MeZO-sized magnitude when σ ≈ ε·|∇L|) are ours, not the authors'."""

    name, title = "fzoo", "FZOO"
    forwards = 9
    default_directions, min_directions = 8, 2   # σ is the spread of the directions' losses
    forwards_per_direction = 1                  # one-sided probes around one shared ℓ0
    forwards_note = "N+1 (9 at the default N = 8)"
    mode_defaults = {mode: (lr * eps, eps) for mode, (lr, eps) in MEZO_PAPER.items()}

    def __init__(self, params, lr=1e-9, eps=1e-3, weight_decay=0.0, seed=0, direction="rademacher",
                 chunk_numel=None, noise_block=NOISE_BLOCK, *, num_directions=8, **kw):
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
        return self.probe_directions(closure, directions), self._center[0] / self._center[1]

    @torch.no_grad()
    def probe_directions(self, closure, directions):
        """ℓ0 once, then the one-sided probe of each direction (direction parallelism: a rank's share of them, each
        rank measuring the same ℓ0 on the same batch); returns the mean ℓ_i."""
        l0 = self.center_loss(closure)
        for q in directions:
            self.probe_one_sided(closure, q, l0)
        return torch.stack([self._measured[q][1] / self._measured[q][3] for q in directions]).mean()

    def _sigma(self) -> torch.Tensor:
        if self._sigma_cache is None:
            # in direction order: ranks that probed different directions first must sum in the same order
            losses = torch.stack([lp / n for _, lp, _, n in self.measurements().values()]).to(torch.float64)
            self._sigma_cache = losses.std()
        return self._sigma_cache

    def _reset_step(self):
        super()._reset_step()
        self._sigma_cache = None

    def _finite(self, g):
        sigma = self._sigma()
        return super()._finite(g) & torch.isfinite(sigma) & (sigma > 0)

    def values_from_g(self, g, group):
        return {"coef": -(g * group["lr"]) / self._sigma()}
