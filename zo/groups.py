"""Parameter groups of a model for the ZO optimizers: weight decay by module type, never by name; and the check
of a group's settings (ZOOptimizer.add_param_group)."""
from __future__ import annotations

import math

from torch import nn

from zo.noise import DIRECTIONS

__all__ = ["param_groups_for_model", "check_group"]

_NORM_TYPES = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase,
                                getattr(nn, "RMSNorm", None)) if t is not None)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm")


def param_groups_for_model(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay / no-decay groups of the trainable parameters; no-decay = owned by a normalisation module
    (by type or a class name ending in "Norm") or registered under the name "bias" by some module."""
    no_decay = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if name == "bias" or _is_norm(module):
                no_decay.add(id(p))
    decay, plain = [], []
    for p in model.parameters():  # deduplicated: a tied tensor appears once
        if p.requires_grad:
            (plain if id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def check_group(g: dict, earlier: list[dict]) -> None:
    """Refuse a param group's invalid settings (`earlier`: the groups added before it), as torch's optimizers do."""
    lr, eps, wd, seed = g["lr"], g["eps"], g["weight_decay"], g["seed"]
    if not lr >= 0:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"Invalid eps (perturbation scale): {eps}")
    if not wd >= 0:
        raise ValueError(f"Invalid weight_decay value: {wd}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed: {seed!r} (need a non-negative int)")
    if g["direction"] not in DIRECTIONS:
        raise ValueError(f"Invalid direction: {g['direction']!r} (choose from {DIRECTIONS})")
    nb, cn = g["noise_block"], g["chunk_numel"]
    if not (isinstance(nb, int) and nb >= 1):
        raise ValueError(f"Invalid noise_block: {nb!r}")
    if cn is not None and not (isinstance(cn, int) and cn >= 1 and cn % nb == 0):
        raise ValueError(f"Invalid chunk_numel: {cn!r} (must be a positive multiple of noise_block={nb}, "
                         "the unit in which the noise is defined)")
    for p in g["params"]:
        if not p.is_floating_point():
            raise ValueError(f"ZO optimizers need floating-point parameters, got {p.dtype}")
    for other in earlier:
        # one probe measures one directional derivative: eps and seed must be global
        if (other["eps"], other["seed"]) != (eps, seed):
            raise ValueError(f"all param groups must share eps and seed, got eps {other['eps']} vs {eps}, "
                             f"seed {other['seed']} vs {seed}")
