"""Prefix tuning: `num_prefix` trainable key/value positions in front of every attention layer.

    model = apply_prefix_tuning(model, num_prefix=5)   # same model object, prefix attached, everything else frozen
    model(input_ids=..., attention_mask=...)            # every call now attends to the prefix
    save_prefix(model, "out/"); load_prefix(base_model, "out/")

For layer l with prefix keys K_l, values V_l ∈ R^{H_kv×P×D} (H_kv = key/value heads: grouped-query models store fewer
K/V heads than query heads), a query q at real position t attends over [K_l ; keys of tokens 0..t]:
    softmax(q·[K_l ; K_0..t]ᵀ/√D)·[V_l ; V_0..t].
The prefix occupies no position: real tokens keep positions 0..L-1, in training, scoring and generation alike.

How it plugs in (no change to `forward`): the prefix is placed in the model's own key/value cache. A forward
pre-hook on the causal-LM module rewrites each call:
* no cache given, or an empty one (as `generate` passes at prefill): a `DynamicCache` is (created and) filled with
  the prefix, expanded to the batch, and the caller's 2-D attention mask gets P leading ones;
* a non-empty cache given: it came from an earlier call through this hook (evaluator prefix caches, generation
  steps), so it already holds the prefix; the mask gets P leading ones if it covers only the real tokens
  (cache + new − P columns) and is left alone if it already covers the prefix;
* `position_ids` not given: computed from the real tokens' mask (cumsum − 1, so left padding works), or as
  past real tokens + arange when there is no mask; never from the cache length, which counts the prefix;
* the cache the hook created is removed from the output when the caller did not ask for one (`use_cache=False`),
  so `generate(use_cache=False)` re-runs the full sequence with a fresh prefix each step, as without prefix.
Gradients reach the prefix through `cache.update`'s concatenation.

Initialisation from real activations (default): P token ids drawn uniformly from the vocabulary by a dedicated
`torch.Generator(seed)` (the global RNG is not touched), run through the frozen model without BOS at positions
0..P-1; each layer's cached keys/values become its prefix. For RoPE models (LLaMA family) those keys already carry
the rotation of positions 0..P-1 and are never rotated again, so a query at position t sees prefix slot j at relative
distance t-j: the prefix starts out as if its tokens sat at positions 0..P-1, overlapping the first real tokens
rather than preceding them. This is only the starting point (the keys are free parameters afterwards) and it is
identical in every code path, unlike the reference, which shifted generated tokens' positions by P.

Parameters: `prefix_keys.<l>` / `prefix_values.<l>` (or, with `reparam`, `prefix_embeds` and the per-layer
`prefix_mlp_keys.<l>` / `prefix_mlp_values.<l>`: Linear(512,512) → Tanh → Linear(512, H_kv·D)), all under the submodule
`prefix_tuning`, so every trainable name contains "prefix". They are kept in fp32 whatever the model dtype, so a ZO
perturbation ε·z and its restore are stored at fp32 precision; they are cast to the model dtype when the cache is
filled (a bf16 model sees them at bf16 resolution, like every other activation).

Limitations: no gradient checkpointing for first-order training (checkpointed layers drop the cache; the hook
raises); needs a decoder-only model whose attention reads its past through `DynamicCache.update` and that accepts
explicit `position_ids` (the `PREFIX_MODEL_TYPES` table); a caller-supplied 4-D mask or a static cache is rejected;
with sliding-window layers the prefix falls out of the window once the sequence is longer than the window.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Decoder-only model types whose attention layers read their past through `DynamicCache.update`, whose masks are
# built from the cache length plus a 2-D mask, and whose forward accepts explicit `position_ids`. opt, llama and
# gpt2 are covered by tests/test_peft_modes.py; the others were checked on tiny random configs under transformers
# 5.24 (hook forward == cache pre-filled by hand, batched evaluator scores == unbatched, cached == uncached greedy
# generation).
PREFIX_MODEL_TYPES = frozenset({
    "opt", "llama", "gpt2", "mistral", "qwen2", "qwen3", "gemma", "gpt_neox", "gptj", "phi", "phi3", "olmo", "olmo2",
    "granite", "stablelm", "starcoder2", "smollm3",
})

REPARAM_DIM = 512
CONFIG_NAME = "prefix_config.json"
WEIGHTS_NAME = "prefix_model.safetensors"


def _linear(fan_in: int, fan_out: int, generator: torch.Generator) -> nn.Linear:
    """nn.Linear with PyTorch's default init (U(±1/√fan_in)), drawn from `generator` instead of the global RNG."""
    layer = torch.nn.utils.skip_init(nn.Linear, fan_in, fan_out)  # the usual init would draw from the global RNG
    bound = 1 / math.sqrt(fan_in)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


class PrefixTuning(nn.Module):
    """Per-layer prefix keys/values and the hooks that put them into the model's cache (see the module docstring)."""

    def __init__(self, num_prefix: int, kv_shapes: list[tuple[int, int]], devices: list[torch.device],
                 reparam: bool = False, generator: torch.Generator | None = None, cache_arg: str = "cache",
                 positional_names: tuple[str, ...] = ()):
        super().__init__()
        self.num_prefix = num_prefix
        self.kv_shapes = [tuple(s) for s in kv_shapes]   # (H_kv, D) per layer
        self.reparam = reparam
        self.cache_arg = cache_arg
        self.positional_names = positional_names
        self.init_token_ids: list[int] | None = None
        self._drop_cache_output = False
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        P = num_prefix
        # Built on CPU (where the generator lives), then moved to each layer's device (device maps put layers apart).
        if reparam:
            self.prefix_embeds = nn.Parameter(torch.randn(P, REPARAM_DIM, generator=gen).to(devices[0]))
            self.prefix_mlp_keys = nn.ModuleList(self._mlp(h * d, gen).to(dev)
                                                 for (h, d), dev in zip(self.kv_shapes, devices))
            self.prefix_mlp_values = nn.ModuleList(self._mlp(h * d, gen).to(dev)
                                                   for (h, d), dev in zip(self.kv_shapes, devices))
        else:
            self.prefix_keys = nn.ParameterList(nn.Parameter(torch.randn(h, P, d, generator=gen).to(dev))
                                                for (h, d), dev in zip(self.kv_shapes, devices))
            self.prefix_values = nn.ParameterList(nn.Parameter(torch.randn(h, P, d, generator=gen).to(dev))
                                                  for (h, d), dev in zip(self.kv_shapes, devices))

    @staticmethod
    def _mlp(out_dim: int, gen: torch.Generator) -> nn.Sequential:
        return nn.Sequential(_linear(REPARAM_DIM, REPARAM_DIM, gen), nn.Tanh(), _linear(REPARAM_DIM, out_dim, gen))

    @property
    def num_layers(self) -> int:
        return len(self.kv_shapes)

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefix keys and values of one layer, each (H_kv, P, D), in fp32."""
        if not self.reparam:
            return self.prefix_keys[layer], self.prefix_values[layer]
        heads, dim = self.kv_shapes[layer]
        mlp_k, mlp_v = self.prefix_mlp_keys[layer], self.prefix_mlp_values[layer]
        embeds = self.prefix_embeds.to(mlp_k[0].weight.device)
        k = mlp_k(embeds).view(self.num_prefix, heads, dim).transpose(0, 1)
        v = mlp_v(embeds).view(self.num_prefix, heads, dim).transpose(0, 1)
        return k, v

    def fill(self, cache, batch: int, dtype: torch.dtype) -> None:
        from transformers import DynamicCache
        if not isinstance(cache, DynamicCache):
            raise ValueError(f"Prefix tuning needs a DynamicCache, got {type(cache).__name__} (a static cache "
                             f"cannot hold the prefix in front of the tokens).")
        for layer in range(self.num_layers):
            cache.update(*self.batch_kv(layer, batch=batch, dtype=dtype), layer)

    # A ZO forward-time probe (zo.probe) runs this with perturbed parameters; in one pass, once per half of the batch.
    zo_probe_batched = {"batch_kv": "batch"}

    def batch_kv(self, layer: int, *, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one layer expanded to the batch, each (batch, H_kv, P, D) in `dtype`: the only place the
        prefix parameters are read while the model runs."""
        k, v = self.layer_kv(layer)
        return (k.to(dtype).unsqueeze(0).expand(batch, -1, -1, -1),
                v.to(dtype).unsqueeze(0).expand(batch, -1, -1, -1))

    # --- hooks on the causal-LM module -----------------------------------------------------------------------------

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict):
        from transformers import DynamicCache
        if model.training and torch.is_grad_enabled() and getattr(model, "is_activation_checkpointing", False):
            raise ValueError("Prefix tuning cannot run under gradient (activation) checkpointing: checkpointed "
                             "layers drop the cache that holds the prefix. Turn --gradient_checkpointing off.")
        if len(args) > len(self.positional_names):
            raise TypeError(f"{type(model).__name__}.forward got {len(args)} positional arguments")
        kwargs = {**dict(zip(self.positional_names, args)), **kwargs}
        other = "past_key_values" if self.cache_arg == "cache" else "cache"
        if kwargs.get(other) is not None and kwargs.get(self.cache_arg) is None:
            kwargs[self.cache_arg] = kwargs.pop(other)
        kwargs.pop(other, None)
        tokens = kwargs.get("input_ids")
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            raise ValueError("Prefix tuning needs input_ids or inputs_embeds.")
        batch, new = tokens.shape[0], tokens.shape[1]
        P = self.num_prefix

        cache = kwargs.get(self.cache_arg)
        created = cache is None
        if created:
            cache = DynamicCache(config=model.config)
        past = cache.get_seq_length()
        if past == 0:
            dtype = kwargs["inputs_embeds"].dtype if kwargs.get("inputs_embeds") is not None \
                else model.get_input_embeddings().weight.dtype
            self.fill(cache, batch, dtype)
            past_real = 0
        elif past < P:
            raise ValueError(f"The given cache holds {past} positions, fewer than the {P}-position prefix; caches must "
                             f"come from earlier calls of this prefix-tuned model.")
        else:
            past_real = past - P

        mask = kwargs.get("attention_mask")
        real_mask = None
        if mask is not None:
            if mask.ndim != 2:
                raise ValueError("Prefix tuning takes a 2-D attention mask (batch, past + new tokens), not a "
                                 f"{mask.ndim}-D one.")
            if mask.shape[1] == past_real + new:
                real_mask = mask
                kwargs["attention_mask"] = torch.cat([mask.new_ones((mask.shape[0], P)), mask], dim=1)
            elif mask.shape[1] == P + past_real + new:
                real_mask = mask[:, P:]
            else:
                raise ValueError(f"attention_mask has {mask.shape[1]} columns; expected past + new real tokens "
                                 f"({past_real} + {new}), optionally plus the {P} prefix positions.")
        if kwargs.get("position_ids") is None:
            if real_mask is not None:
                kwargs["position_ids"] = (real_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
            else:
                kwargs["position_ids"] = torch.arange(past_real, past_real + new, device=tokens.device)[None]
        kwargs[self.cache_arg] = cache
        wants_cache = kwargs.get("use_cache")
        if wants_cache is None:
            wants_cache = getattr(model.config, "use_cache", True)
        self._drop_cache_output = created and not wants_cache
        return (), kwargs

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict, output):
        if self._drop_cache_output:
            self._drop_cache_output = False
            if isinstance(output, dict) and self.cache_arg in output:
                # Rebuilt rather than set to None: a key holding None still counts as a cache for `generate`.
                return type(output)(**{k: v for k, v in output.items() if k != self.cache_arg})
        return output


def has_prefix(model: nn.Module) -> bool:
    return isinstance(getattr(model, "prefix_tuning", None), PrefixTuning)


def prefix_module(model: nn.Module) -> PrefixTuning:
    module = getattr(model, "prefix_tuning", None)
    if not isinstance(module, PrefixTuning):
        raise ValueError("This model has no prefix from prefix.apply_prefix_tuning / prefix.load_prefix.")
    return module


def _check_supported(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    """The model's cache keyword and positional parameter names; ValueError for models this cannot handle."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in PREFIX_MODEL_TYPES:
        raise ValueError(f"Prefix tuning does not support model type {model_type!r}; supported: "
                         f"{', '.join(sorted(PREFIX_MODEL_TYPES))}. Use --lora or full fine-tuning instead.")
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError(f"Prefix tuning handles decoder-only self-attention; this {model_type!r} model has "
                         f"cross-attention.")
    params = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values" if "past_key_values" in params else None
    if cache_arg is None or "position_ids" not in params:
        raise ValueError(f"Prefix tuning needs a forward that takes a cache and position_ids; "
                         f"{type(model).__name__} ({model_type!r}) does not.")
    positional = tuple(n for n, p in params.items()
                       if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return cache_arg, positional


@torch.no_grad()
def _real_activations(model: nn.Module, token_ids: torch.Tensor, cache_arg: str):
    """The cache (one layer per entry) of the frozen model run on `token_ids` (1, P) at positions 0..P-1."""
    from transformers import DynamicCache
    was_training = model.training
    model.eval()
    try:
        out = model(input_ids=token_ids, use_cache=True)
    finally:
        model.train(was_training)
    cache = out.get(cache_arg) if out.get(cache_arg) is not None else out.get("past_key_values")
    if not isinstance(cache, DynamicCache) or any(getattr(cache, "is_linear", [])):
        raise ValueError(f"{model.config.model_type!r} did not return a DynamicCache of attention layers; prefix "
                         f"tuning cannot place key/value positions in it.")
    return cache


def apply_prefix_tuning(model: nn.Module, num_prefix: int = 5, reparam: bool = False, init_by_real_act: bool = True,
                        seed: int = 0) -> nn.Module:
    """Attach `num_prefix` trainable K/V positions per layer to `model` (in place), freeze everything else, and return
    the model. It is called exactly like before (same forward kwargs, `generate`, `config`)."""
    if num_prefix <= 0:
        raise ValueError(f"--num_prefix must be positive, got {num_prefix}.")
    if isinstance(getattr(model, "prefix_tuning", None), PrefixTuning):
        raise ValueError("This model already has a prefix; apply_prefix_tuning once per model.")
    if reparam and init_by_real_act:
        raise ValueError("Initialising from real activations sets the prefix K/V directly, which the MLP "
                         "reparameterisation cannot represent; pass init_by_real_act=False with reparam=True.")
    cache_arg, positional = _check_supported(model)

    generator = torch.Generator().manual_seed(seed)
    device = model.get_input_embeddings().weight.device
    vocab = getattr(model.config, "vocab_size", None) or model.get_input_embeddings().num_embeddings
    token_ids = torch.randint(0, vocab, (1, num_prefix), generator=generator)
    # The real-activation pass also reveals each layer's K/V layout (heads, head_dim, device), whatever the config
    # calls those fields.
    cache = _real_activations(model, token_ids.to(device), cache_arg)
    layers = cache.layers
    if len(layers) == 0 or any(layer.keys is None or layer.keys.shape[-2] != num_prefix for layer in layers):
        raise ValueError(f"{model.config.model_type!r}: the cache does not hold {num_prefix} positions per layer; "
                         f"its attention cannot take a prefix.")
    kv_shapes = [(layer.keys.shape[1], layer.keys.shape[3]) for layer in layers]
    devices = [layer.keys.device for layer in layers]

    for p in model.parameters():
        p.requires_grad_(False)
    module = PrefixTuning(num_prefix, kv_shapes, devices, reparam=reparam, generator=generator, cache_arg=cache_arg,
                          positional_names=positional)
    module.init_token_ids = token_ids[0].tolist()
    if init_by_real_act:
        with torch.no_grad():
            for i, layer in enumerate(layers):
                module.prefix_keys[i].copy_(layer.keys[0].float())
                module.prefix_values[i].copy_(layer.values[0].float())
    model.add_module("prefix_tuning", module)
    # Bound methods of the submodule (not closures), so `copy.deepcopy(model)` hooks the copy to its own prefix.
    model.register_forward_pre_hook(module._before_forward, with_kwargs=True)
    model.register_forward_hook(module._after_forward, with_kwargs=True)
    if any(getattr(cache, "is_sliding", [])):
        logger.warning("%s has sliding-window layers: the prefix leaves their window once a sequence is longer "
                       "than the window.", model.config.model_type)
    logger.info("Prefix tuning: %d positions x %d layers (%s init), %d trainable parameters", num_prefix,
                len(kv_shapes), "real-activation" if init_by_real_act else "random",
                sum(p.numel() for p in module.parameters()))
    return model


# --- saving and loading ---------------------------------------------------------------------------------------------

def save_prefix(model: nn.Module, path: str | os.PathLike) -> None:
    """Only the prefix: `prefix_config.json` (shape and provenance) and `prefix_model.safetensors`."""
    from safetensors.torch import save_file
    module = prefix_module(model)
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, os.path.join(path, WEIGHTS_NAME))
    config = {"num_prefix": module.num_prefix, "reparam": module.reparam, "kv_shapes": module.kv_shapes,
              "model_type": model.config.model_type, "init_token_ids": module.init_token_ids}
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)


def load_prefix(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Prefix saved by `save_prefix`: attached to a plain model, or loaded in place into a prefix-tuned one."""
    from safetensors.torch import load_file
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; was it written by prefix.save_prefix?")
    with open(config_path) as f:
        config = json.load(f)
    if config["model_type"] != model.config.model_type:
        raise ValueError(f"Prefix at {path} was trained on a {config['model_type']!r} model, not "
                         f"{model.config.model_type!r}.")
    if not isinstance(getattr(model, "prefix_tuning", None), PrefixTuning):
        model = apply_prefix_tuning(model, num_prefix=config["num_prefix"], reparam=config["reparam"],
                                    init_by_real_act=False)
    module = prefix_module(model)
    if [list(s) for s in module.kv_shapes] != [list(s) for s in config["kv_shapes"]] or \
            module.num_prefix != config["num_prefix"] or module.reparam != config["reparam"]:
        raise ValueError(f"Prefix at {path} ({config['num_prefix']} positions, K/V shapes {config['kv_shapes']}) "
                         f"does not fit this model's prefix ({module.num_prefix}, {module.kv_shapes}).")
    state = load_file(os.path.join(path, WEIGHTS_NAME))
    module.load_state_dict(state, strict=True)
    module.init_token_ids = config.get("init_token_ids")
    return model
