"""LoRA through `peft`: which projections get adapters, freezing, and adapter/merged saving.

    model = apply_lora(model, r=8, alpha=16)        # a peft `PeftModel` around the model, LoRA layers injected
    save_adapter(model, "out/")                      # adapter_config.json + adapter_model.safetensors (PEFT format)
    model = load_adapter(base_model, "out/")         # or, on a model that already has LoRA, reload its weights
    save_merged(model, "out/")                       # plain full-weight checkpoint: W + (alpha/r)·B·A

Each adapted linear map computes y = x Wᵀ + b + (alpha/r)·x Aᵀ Bᵀ with A ∈ R^{r×in} (Kaiming-uniform) and
B ∈ R^{out×r} (zeros), so a freshly adapted model computes exactly what the base model computes.

Design decisions:
* The adapted model is peft's `PeftModel` (`peft.get_peft_model`), as peft and the Hugging Face `Trainer` expect: the
  Trainer saves a `PeftModel`'s checkpoints as the adapter only and loads them back, for resuming and for the best
  model, through its public code paths, so LoRA needs no special handling in trainer_zo. It forwards every keyword
  (`position_ids`, the cache, `logits_to_keep`) to the model, and `generate`, `config` and the input embeddings are
  the model's; the one difference is its `forward` signature, so callers that pick arguments from it look at
  `model.get_base_model().forward` (evaluator.cache_keyword).
* dtype: LoRA weights stay fp32 even for fp16/bf16 models (peft's default `autocast_adapter_dtype=True`; peft casts
  the layer input to the adapter dtype for the LoRA branch and the result back to the model dtype). For ZO this
  matters: stored in bf16 (8 significant bits), θ ± ε·z would be rounded by up to 0.4 % of |θ|, a large fraction of
  ε·z itself for ε = 1e-3, and perturb/restore round trips would drift. In fp32 the adapter keeps every perturbation
  and update exactly enough; the branch output is still rounded to the model dtype when it is added to the frozen
  path, so bf16 models see the perturbation at bf16 resolution (a larger ε may be advisable there).
* `seed` (default 0) makes peft's Kaiming-uniform draw of A reproducible; the global RNG state is forked and
  restored around it, so other randomness in the run does not depend on whether LoRA was applied.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Sequence

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Projections that get adapters, by `config.model_type`. Query and value projections, as in the LoRA paper and the
# MeZO reference; fused-QKV architectures adapt the fused projection. Override with `--lora_target_modules`.
LORA_TARGET_MODULES: dict[str, list[str]] = {
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "olmo": ["q_proj", "v_proj"],
    "olmo2": ["q_proj", "v_proj"],
    "granite": ["q_proj", "v_proj"],
    "smollm3": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "starcoder2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
}

ADAPTER_NAME = "default"


def is_lora_model(model: nn.Module) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel) and not model.peft_config[model.active_adapter].is_prompt_learning


def _require_lora(model: nn.Module) -> None:
    if not is_lora_model(model):
        raise ValueError("This model has no LoRA adapters from lora.apply_lora / lora.load_adapter.")


def resolve_target_modules(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[str]:
    """Explicit targets, else the table entry for the model type; every name must match at least one module."""
    model_type = getattr(model.config, "model_type", None)
    if target_modules is None:
        if model_type not in LORA_TARGET_MODULES:
            raise ValueError(f"LoRA has no default target modules for model type {model_type!r} (known: "
                             f"{', '.join(sorted(LORA_TARGET_MODULES))}). Name the projections to adapt with "
                             f"--lora_target_modules, e.g. --lora_target_modules q_proj,v_proj.")
        target_modules = LORA_TARGET_MODULES[model_type]
    targets = [t.strip() for t in target_modules if t and t.strip()]
    if not targets:
        raise ValueError("--lora_target_modules is empty; name at least one projection, e.g. q_proj,v_proj.")
    names = [name for name, _ in model.named_modules()]
    # peft matches a target by the last components of the module name, so "q_proj" matches "...self_attn.q_proj".
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_adaptable(m)})
        raise ValueError(f"LoRA target module(s) {missing} match no module of this {model_type!r} model. "
                         f"Linear layer names it has: {', '.join(leaves)} (set --lora_target_modules).")
    return targets


def _is_adaptable(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D
    return isinstance(module, (nn.Linear, Conv1D))


def _uses_conv1d(model: nn.Module, targets: list[str]) -> bool:
    """GPT-2-style `Conv1D` stores its weight as (in, out); peft must then be told `fan_in_fan_out=True`."""
    from transformers.pytorch_utils import Conv1D
    return any(isinstance(m, Conv1D) and any(n == t or n.endswith("." + t) for t in targets)
               for n, m in model.named_modules())


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, target_modules: Sequence[str] | None = None,
               dropout: float = 0.0, seed: int | None = 0) -> nn.Module:
    """Inject LoRA adapters, freeze every other parameter, and return the adapted model (a `PeftModel`).

    `seed` makes the initialisation of A reproducible without touching the global RNG state (peft draws A from the
    global generator; it is forked and restored around the call). `dropout` must stay 0 for ZO training: the two probes
    of one step have to evaluate the same function of the parameters.
    """
    from peft import LoraConfig, get_peft_model

    if is_lora_model(model):
        raise ValueError("This model already has LoRA adapters; apply_lora once per model.")
    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got --lora_r {r}.")
    targets = resolve_target_modules(model, target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout, bias="none",
                        task_type="CAUSAL_LM", fan_in_fan_out=_uses_conv1d(model, targets))
    with _seeded(seed, model), warnings.catch_warnings():
        # peft probes a transformers attribute that 5.x deprecated; nothing the user can act on
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapted = get_peft_model(model, config)
    _freeze_all_but_lora(adapted)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    logger.info("LoRA r=%d alpha=%s on %s: %d trainable parameters", r, alpha, targets, trainable)
    return adapted


class _seeded:
    """Fork the torch RNG (CPU and the model's CUDA device), seed it, and restore it on exit."""

    def __init__(self, seed: int | None, model: nn.Module):
        self.seed = seed
        device = next(model.parameters()).device
        self.devices = [device.index or 0] if device.type == "cuda" else []

    def __enter__(self):
        if self.seed is None:
            return
        self.fork = torch.random.fork_rng(devices=self.devices)
        self.fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        if self.seed is not None:
            self.fork.__exit__(*exc)


def _freeze_all_but_lora(model: nn.Module) -> None:
    from peft.tuners.lora import LoraLayer
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in ("lora_A", "lora_B"):
                for p in getattr(module, name).parameters():
                    p.requires_grad_(True)


def lora_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named LoRA tensors (A and B of every adapted layer)."""
    return {n: p for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}


# --- saving and loading ---------------------------------------------------------------------------------------------

def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Adapter only, in the standard PEFT layout (loadable by `load_adapter` and by `PeftModel.from_pretrained`)."""
    _require_lora(model)
    model.save_pretrained(str(path))


def load_adapter(model: nn.Module, path: str | os.PathLike, trainable: bool = True) -> nn.Module:
    """Adapters saved by `save_adapter`.

    On a base model: inject LoRA as configured in `path` and load its weights (returns the adapted model).
    On a model that already has LoRA (e.g. to resume): copy the weights in place, after checking that every adapter
    tensor of the model is in the file with the same shape.
    """
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    path = str(path)
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"{path} has no adapter_config.json; was it written by lora.save_adapter?")
    if is_lora_model(model):
        saved = LoraConfig.from_pretrained(path)
        current = model.peft_config[ADAPTER_NAME]
        if (saved.r, saved.lora_alpha) != (current.r, current.lora_alpha):
            raise ValueError(f"Adapter at {path} has r={saved.r}, alpha={saved.lora_alpha}; this model's LoRA has "
                             f"r={current.r}, alpha={current.lora_alpha}.")
        weights = load_peft_weights(path, device=str(next(model.parameters()).device))
        # Checked before anything is copied, so a mismatch leaves the model as it was. File keys are the PeftModel's
        # names without the adapter name.
        expected = {n.replace(f".{ADAPTER_NAME}.", "."): p.shape for n, p in lora_parameters(model).items()}
        found = {k: v.shape for k, v in weights.items()}
        if expected != found:
            missing = sorted(set(expected) - set(found))
            unexpected = sorted(set(found) - set(expected))
            resized = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
            raise ValueError(f"Adapter at {path} does not fit this model (different rank or target modules?): "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}, other shape {resized[:3]}.")
        set_peft_model_state_dict(model, weights, adapter_name=ADAPTER_NAME)
        return model
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        adapted = PeftModel.from_pretrained(model, path, is_trainable=trainable)
    if trainable:
        _freeze_all_but_lora(adapted)
    return adapted


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapted weight replaced by W + (alpha/r)·B·A, in the base dtype.

    Built without modifying the model (no merge/unmerge round trip, which is inexact in half precision), and
    allocating only the merged weights of the adapted layers.
    """
    from peft.tuners.lora import LoraLayer

    _require_lora(model)
    base = model.get_base_model()
    deltas = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A:
            deltas[f"{name}.base_layer.weight"] = module.get_delta_weight(ADAPTER_NAME)
    merged = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        if key in deltas:
            value = (value.float() + deltas[key].to(value.device).float()).to(value.dtype)
        merged[key.replace(".base_layer.", ".")] = value
    return merged


def save_merged(model: nn.Module, path: str | os.PathLike) -> None:
    """A plain Hugging Face checkpoint of the merged weights: `AutoModelForCausalLM.from_pretrained(path)` loads it
    without peft, computing what the adapted model computes (up to one rounding of W + ΔW to the model dtype)."""
    state_dict = merged_state_dict(model)
    model.get_base_model().save_pretrained(str(path), state_dict=state_dict)
    with open(os.path.join(path, "lora_merged.json"), "w") as f:
        config = model.peft_config[ADAPTER_NAME]
        json.dump({"r": config.r, "lora_alpha": config.lora_alpha,
                   "target_modules": sorted(config.target_modules)}, f, indent=2)
