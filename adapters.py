"""The training modes that change only part of a model, as one table: how each is applied to a loaded model, how a
model is recognised as carrying it, how the trained part is saved, and how a checkpoint of it is loaded back.

    adapter = ADAPTERS[config.mode]                       # "lora", "prefix" or "head" (full fine-tuning: none)
    model = adapter.apply(model, config)
    adapter.export(model, folder, merged=False)           # --save_model
    adapter_of(model).checkpoint_load(model, checkpoint)  # resuming, loading the best (None: HF loads it)

Who saves and loads checkpoints:
* LoRA: the model is peft's `PeftModel`, which the Hugging Face Trainer saves as the adapter only and loads back by
  itself (`checkpoint_load` is None).
* Prefix tuning: a module of our own inside the model. Its checkpoints hold the prefix only (`prefix_config.json`
  marks them), loaded by `prefix.load_prefix` through trainer_zo's two checkpoint-loading overrides.
* Head tuning: the full model is saved, as in full fine-tuning (the head is a slice of it), and HF loads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from torch import nn

import heads
import lora
import prefix


@dataclass(frozen=True)
class Adapter:
    name: str
    apply: Callable[[nn.Module, object], nn.Module]          # (pretrained model, RunConfig) -> adapted model
    carried_by: Callable[[nn.Module], bool]                   # whether a model carries this adapter
    export: Callable[[nn.Module, str, bool], bool]            # (model, folder, merged) -> True if it saved
    checkpoint_marker: str | None = None                      # file marking a checkpoint that holds only this adapter
    checkpoint_load: Callable[[nn.Module, str], nn.Module] | None = None   # None: the HF Trainer loads it

    def in_checkpoint(self, folder: str | None) -> bool:
        return bool(folder) and self.checkpoint_marker is not None and \
            os.path.isfile(os.path.join(folder, self.checkpoint_marker))


def _apply_lora(model, config):
    peft = config.peft
    targets = peft.lora_target_modules.split(",") if peft.lora_target_modules else None
    return lora.apply_lora(model, r=peft.lora_r, alpha=peft.lora_alpha, target_modules=targets)


def _export_lora(model, folder, merged):
    (lora.save_merged if merged else lora.save_adapter)(model, folder)
    return True


def _apply_prefix(model, config):
    peft = config.peft
    return prefix.apply_prefix_tuning(model, num_prefix=peft.num_prefix, reparam=peft.prefix_reparam,
                                      init_by_real_act=peft.prefix_init_by_real_act, seed=config.hf.seed)


def _export_prefix(model, folder, merged):
    prefix.save_prefix(model, folder)
    return True


def _apply_head(model, config):
    heads.enable_head_tuning(model)
    return model


ADAPTERS: dict[str, Adapter] = {
    "lora": Adapter("lora", apply=_apply_lora, carried_by=lora.is_lora_model, export=_export_lora),
    "prefix": Adapter("prefix", apply=_apply_prefix, carried_by=prefix.has_prefix, export=_export_prefix,
                      checkpoint_marker=prefix.CONFIG_NAME, checkpoint_load=prefix.load_prefix),
    # the trained head is part of the full weights: the caller saves the model
    "head": Adapter("head", apply=_apply_head, carried_by=heads.has_head_tuning,
                    export=lambda model, folder, merged: False),
}


def adapter_of(model: nn.Module) -> Adapter | None:
    """The adapter a model carries; None for a model trained in full."""
    return next((a for a in ADAPTERS.values() if a.carried_by(model)), None)
