"""Low-rank ZO methods on the core protocol of zo.core.ZOOptimizer: LOZO, LOZO-M and SubZero.

Each weight matrix W (m x n, any tensor of two or more dimensions viewed as shape[0] x the rest; LoRA's A and B and the
prefix key/value tensors are matrices too) is perturbed along a rank-r direction A·Bᵀ whose factors are drawn from the
counter noise (ZOOptimizer.noise, zo.noise's counter stream: a pure function of seed, tensor, stream and element
position, Gaussian or ±1 as --zo_direction says) and applied in place with addmm_ (BLAS on CPU, cuBLAS on CUDA: these methods' fast path on
every device; no dense m x n direction is ever formed).  Vectors (biases, norms) get a full element-wise direction z
as the authors' code gives them, through the core's rule sweeps (C / Triton kernels); the matrices through
sweep_tensor, the core's call for the tensors a method sweeps itself (the stash is the core's).

Sharding (FSDP2, dimension 0): a shard holding rows [a, b) of W perturbs by A[a:b]·Bᵀ.  LOZO draws the rows of A at
their element positions (row i of A is positions i·r .. i·r+r-1 of its stream), so a shard draws exactly its slice;
SubZero's U comes from a QR of the whole m x r draw, which every rank computes and slices.

The perturb / restore round trip is not bit-exact without a stash (as for the element-wise methods: x + ε·d - ε·d
rounds); exact_restore has the same meaning here (the stash is a copy of the tensor, taken at the first probe)."""
from __future__ import annotations

import logging
import math

import torch

from parallel import local_part
from zo.core import NOISE_BLOCK, Rule, TensorSweep, ZOOptimizer
from zo.hparams import shared
from zo.noise import step_seed
from zo.methods.family import MEZO_PAPER, ModeDefault, borrowed

__all__ = ["LOZO", "LOZOM", "SubZero"]

logger = logging.getLogger(__name__)


class _LowRank(ZOOptimizer):
    """The sweeps of rank-r directions A·Bᵀ for matrices; a subclass says how its factors are drawn (`_factors`) and
    how its update combines them (`_update_matrix`)."""

    streams = ("z",)
    update_values = ("coef",)

    def __init__(self, params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw):
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)
        if kw.get("keep_direction"):
            raise ValueError(f"{self.title} regenerates its small factors each sweep; keep_direction (a dense copy of "
                             "the direction) does not apply: drop it")
        if any(p.device.type == "cuda" for group in self.param_groups for p in group["params"]):
            logger.info("%s: matrices are swept by addmm_ (cuBLAS), vectors by the core's element-wise path",
                        self.title)

    @staticmethod
    def rule(noise, state, s):
        return Rule(direction=noise.z, step=noise.z * s.coef)

    def values_from_g(self, g, group):
        return {"coef": -(g * group["lr"])}

    # -- which tensors are matrices, and their factors
    def matrix_shape(self, p) -> tuple[int, int] | None:
        """(m, n) of the full tensor p seen as a matrix, or None for a vector (swept element-wise)."""
        if p.dim() < 2 or p.numel() == 0:
            return None
        return p.shape[0], p.numel() // p.shape[0]

    def elementwise(self, p) -> bool:
        return self.matrix_shape(p) is None

    def refresh_step(self, t: int | None = None) -> int:
        """The step whose seed draws the slowly changing factor in use at step t (every `interval` steps)."""
        t = self.step_count if t is None else t
        return t - t % self.interval

    def _rows(self, p, n) -> tuple[int, int]:
        """(first row, rows) of the part of p this process holds."""
        offset, local = self.noise_offset(p), local_part(p).numel()
        if offset % n or local % n:
            raise ValueError(f"{self.title}: this shard of a {tuple(p.shape)} tensor starts at element {offset} and "
                             f"holds {local}, not whole rows of its {n}-wide matrix view; shard on dimension 0")
        return offset // n, local // n

    # -- the sweep of the matrices (the core's sweeps handle the stash)
    def sweep_tensor(self, s: TensorSweep):
        m, n = self.matrix_shape(s.p)
        row0, rows = self._rows(s.p, n)
        x = s.x.view(rows, n)
        a, b = self._factors(s.index, s.group, s.p, (m, n), row0, rows, x.dtype)
        if s.kind != "update":
            x.addmm_(a, b.T, alpha=s.scale)
            return
        if s.restore_scale:
            x.addmm_(a, b.T, alpha=s.restore_scale)
        if bool(s.values["ok"]):   # a host sync: the matrices' path is torch operations
            self._update_matrix(s.index, s.group, s.p, x, a, b, s.values)

    def _update_matrix(self, index, group, p, x, a, b, values):
        """x <- x·decay + coef·A·Bᵀ (the update of LOZO and SubZero)."""
        x.addmm_(a, b.T, beta=values["decay"], alpha=float(values["coef"]))

    def _factors(self, index, group, p, shape, row0, rows, dtype):
        raise NotImplementedError


class LOZO(_LowRank):
    """LOZO (Chen et al., ICLR 2025, arXiv 2410.07698; optsuite/LOZO): for each weight matrix W (m x n) the direction
    is U·Vᵀ, U (m x r) drawn fresh every step, V (n x r) redrawn every ν steps (`interval`):
        g = (L(W + εUVᵀ) - L(W - εUVᵀ))/(2ε),   W <- W - η·(g·U·Vᵀ + λW)
    vectors: MeZO's z.  We follow the paper: the update moves along the U·Vᵀ that was probed, at every step.  No
    1/r scaling, as the authors' code.  V is not stored: it is regenerated from the seed of its refresh step.
    Where the authors' code (optsuite/LOZO large_models/LOZOtrainer.py, lowrank_zo_perturb_parameters and
    lowrank_zo_update) departs: it redraws the update's factors from the step's seed drawing U only, so at a refresh
    step (every ν steps, step 0 included), where the probe drew V before U, the update's U comes from the stream
    positions the probe used for V (and every later tensor's noise shifts): it updates along a direction it did not
    probe.  Its weight decay skips parameters by name (bias, layer norm); ours by module type (the same set).
    Defaults: r = 2, ν = 50 (run_lozo.py) and, in full fine-tuning, η = 1e-6, ε = 1e-3 (the README's OPT table, LR
    {1e-6, 1e-7}); LoRA / prefix values are MeZO's (the authors publish none).  No state."""

    name, title = "lozo", "LOZO"
    mode_defaults = {**borrowed(MEZO_PAPER, "LOZO's authors"),
                     "ft": ModeDefault(1e-6, 1e-3, "LOZO's README (OPT-13B, full parameters)")}
    hyperparameters = (shared("rank", 2), shared("interval", 50, flag="zo_nu"))

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, **kw):
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    @classmethod
    def memory(cls):
        return f"{cls.title}: no memory beyond the model (rank-r factors, regenerated each sweep)"

    def _v(self, index, group, n, t, device, dtype):
        seed = step_seed(group["seed"], self.refresh_step(t))
        return self.noise(index, 1, 0, n * self.rank, group=group, device=device,
                          seed=seed).view(n, self.rank).to(device, dtype)

    def _factors(self, index, group, p, shape, row0, rows, dtype):
        u = self.noise(index, 0, row0 * self.rank, rows * self.rank, group=group, device=p.device)
        return (u.view(rows, self.rank).to(p.device, dtype),
                self._v(index, group, shape[1], self.step_count, p.device, dtype))


class LOZOM(LOZO):
    """LOZO-M (the momentum variant of LOZO): the momentum of a matrix lives in factor space, M (m x r):
        M <- β·M + (1-β)·g·U,   W <- W - η·(M·Vᵀ + λW)
    and where V is redrawn (every ν steps) M is first carried into the new basis, M <- β·M·V_oldᵀ·V_new/n + (1-β)·g·U;
    the first step sets M = g·U.  Vectors keep a full momentum m <- β·m + (1-β)·g·z (m = g·z at the first step).  The
    formulas are the authors' code's (optsuite/LOZO medium_models/src/LOZOtrainer.py, the RoBERTa-sized models: the
    large-model code has no LOZO-M), including the carry's 1/n; we depart from it where LOZO does (above: one U per
    step, probed and applied).  β = 0.9: their lozo.sh (their run_lozo.py's own default is 0.7).  Defaults for LR / ε
    are LOZO's.  State: M per matrix (m x r) and m per vector element."""

    name, title = "lozo_m", "LOZO-M"
    buffers = ("momentum",)
    extra_state = ("factor_momentum", "factor_basis")
    step_values = ("beta",)
    update_values = ("gm", "neg_lr")
    hyperparameters = LOZO.hyperparameters + (shared("beta1", 0.9, keyword="beta"),)

    @classmethod
    def memory(cls):
        return (f"{cls.title}: +r x rows per matrix (factor momentum) and +1 x each vector's elements (momentum), "
                "in the parameter dtype")

    @staticmethod
    def rule(noise, state, s):
        m = state.momentum * s.beta + noise.z * s.gm
        return Rule(direction=noise.z, step=m * s.neg_lr, state={"momentum": m})

    def values_at(self, t):
        return {"beta": self.beta if t > 0 else 0.0}

    def values_from_g(self, g, group):
        first = self.step_count == 0
        return {"gm": g if first else g * (1.0 - self.beta),
                "neg_lr": torch.full((), -group["lr"], dtype=torch.float64, device=g.device)}

    def _update_matrix(self, index, group, p, x, a, b, values):
        st, basis = self.state[p], self.refresh_step()
        gu = a * float(values["gm"])
        old = st.get("factor_momentum")
        if old is None:
            new = gu
        else:
            old = old.to(a.dtype)
            if st["factor_basis"] != basis:  # V was redrawn since M was formed: carry M into the new basis
                v_old = self._v(index, group, b.shape[0], st["factor_basis"], p.device, a.dtype)
                old = old @ (v_old.T @ b) / b.shape[0]
            new = old * self.beta + gu
        st["factor_momentum"], st["factor_basis"] = new, basis
        x.addmm_(new, b.T, beta=values["decay"], alpha=float(values["neg_lr"]))


class SubZero(_LowRank):
    """SubZero (Yu et al., ICCV 2025, arXiv 2410.08989; zimingyy/SubZero): for each weight matrix W (m x n) the
    direction is U·Z·Vᵀ·√(mn)/r with column-orthonormal U (m x r) and V (n x r), the Q factors of QRs of Gaussian
    draws redrawn every T steps (`interval`, lazy subspace refresh), and a fresh r x r Gaussian core Z every step:
        g = (L(W + εP) - L(W - εP))/(2ε),   P = U·Z·Vᵀ·√(mn)/r,   W <- W - η·(g·P + λW)
    vectors: MeZO's z.  As the authors' code (large_models/trainer.py, zo_subspace_step / fast_svd_method_v2); the
    √(mn)/r scale is theirs.  In LoRA / prefix / prompt modes their code views every adapter tensor as the most square
    factorisation of its size; we do that only for a matrix whose smaller side is below r (where a rank-r basis does
    not exist), and keep a matrix's own shape otherwise.  The method stores its subspace: U and V, (m+n)·r per matrix,
    kept in memory between refreshes (not in checkpoints: a resumed run recomputes them from the refresh step's seed).
    Defaults: r = 8, T = 2000 (the authors' run.py); LR / ε: MeZO's per mode (the authors' example: prompt tuning
    η = 1e-3, ε = 1e-2, r = 24, T = 1000)."""

    name, title = "subzero", "SubZero"
    mode_defaults = borrowed(MEZO_PAPER, "SubZero's authors")
    hyperparameters = (shared("rank", 8), shared("interval", 2000, flag="zo_T"))

    def __init__(self, params, lr=1e-6, eps=1e-3, weight_decay=0.0, seed=0, direction="gaussian",
                 chunk_numel=None, noise_block=NOISE_BLOCK, **kw):
        self._subspaces: dict[int, tuple] = {}
        super().__init__(params, lr, eps, weight_decay, seed, direction, chunk_numel, noise_block, **kw)

    @classmethod
    def memory(cls):
        return f"{cls.title}: +(rows + columns) x r per matrix (its subspace U, V, float32; not checkpointed)"

    def matrix_shape(self, p):
        shape = [s for s in p.shape if s != 1] or [1]
        if len(shape) < 2:
            return None
        m, n = shape[0], p.numel() // shape[0]
        if min(m, n) < self.rank:   # no rank-r basis in this shape: the most square factorisation of its size
            m = max(d for d in range(1, math.isqrt(p.numel()) + 1) if p.numel() % d == 0)
            n = p.numel() // m
            if min(m, n) < self.rank:
                return None   # too small for rank r in any shape: a vector to this method
        return m, n

    def _rows(self, p, n):
        if n != p.numel() // p.shape[0] and self.noise_offset(p):
            raise ValueError(f"{self.title}: a shard of the {tuple(p.shape)} tensor, which this method views as a "
                             f"{p.numel() // n} x {n} matrix; shard only tensors with r <= their smaller side")
        return super()._rows(p, n)

    def _subspace(self, index, group, shape, device):
        refresh = self.refresh_step()
        held = self._subspaces.get(index)
        if held is None or held[0] != refresh:
            seed = step_seed(group["seed"], refresh)
            m, n = shape
            r = self.rank
            u = torch.linalg.qr(self.noise(index, 1, 0, m * r, group=group, device=device, seed=seed).view(m, r))[0]
            v = torch.linalg.qr(self.noise(index, 2, 0, n * r, group=group, device=device, seed=seed).view(n, r))[0]
            held = self._subspaces[index] = (refresh, u.contiguous(), v.contiguous())
        return held[1], held[2]

    def _factors(self, index, group, p, shape, row0, rows, dtype):
        u, v = self._subspace(index, group, shape, p.device)
        r = self.rank
        core = self.noise(index, 0, 0, r * r, group=group, device=p.device).view(r, r)
        scale = math.sqrt(shape[0] * shape[1]) / r
        return (u[row0:row0 + rows] @ core * scale).to(dtype), v.to(dtype)
