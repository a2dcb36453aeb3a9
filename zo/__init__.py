"""Zeroth-order optimizers for fine-tuning (torch.optim.Optimizer subclasses), as one layered library:

    registry  ->  methods  ->  core  ->  sweeps  ->  backends (C, Triton)  ->  rule, noise
                               core  ->  probe (forward-time probes; imports only torch)
                  offload  ->  core (weights streamed from host memory, --zo_offload; imported where used)

The suite enters it at three points: the registry (`--zo_optim` name -> class, each method's hyper-parameters and
default LR / ε), the optimizer protocol (`ZOOptimizer`: probe, step, settle, state, checkpoints) and
`param_groups_for_model`.  A new element-wise method is one `Rule` (zo.rule); the backends are imported only when a
sweep first needs them (a CPU-only install never imports Triton).
"""
from zo.core import ZOOptimizer, kernel_builds, kernels_available, param_groups_for_model, triton_available
from zo.noise import DIRECTIONS, NOISE_BLOCK, RNGS, direction_seed, sample_direction, step_seed
from zo.probe import PROBE_MODES, ForwardProbe
from zo.rule import Rule

__all__ = ["ZOOptimizer", "Rule", "registry", "OPTIMIZERS", "get", "param_groups_for_model", "DIRECTIONS",
           "NOISE_BLOCK", "RNGS", "step_seed", "direction_seed", "sample_direction", "kernels_available",
           "triton_available", "kernel_builds", "PROBE_MODES", "ForwardProbe"]


def __getattr__(name):
    # the registry imports every method: loaded on first use, so that `python -m zo.registry` runs it only once
    if name in ("registry", "OPTIMIZERS", "get"):
        import importlib
        registry = importlib.import_module("zo.registry")
        return registry if name == "registry" else getattr(registry, name)
    raise AttributeError(f"module 'zo' has no attribute {name!r}")
