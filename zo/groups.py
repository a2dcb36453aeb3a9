"""Parameter groups of a model for the ZO optimizers: weight decay by module type, never by name."""
from __future__ import annotations

from torch import nn

__all__ = ["param_groups_for_model"]

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
