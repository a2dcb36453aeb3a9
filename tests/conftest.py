"""Shared fixtures: tiny random-weight models built from a config in-process, and a byte-level tokenizer."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"
VOCAB = 300  # 256 byte ids + specials, enough for ByteTokenizer


class ByteTokenizer:
    """Deterministic byte-level tokenizer with the slice of the HF interface the suite uses."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    eos_token, pad_token = "<eos>", "<pad>"
    padding_side = "left"

    def __init__(self, add_bos: bool = True):
        self.add_bos = add_bos

    def __call__(self, text, add_special_tokens=True):
        ids = list(text.encode("utf-8"))
        return {"input_ids": ([self.bos_token_id] if add_special_tokens and self.add_bos else []) + ids}

    def decode(self, ids, skip_special_tokens=False):
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i < 256]
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_model(kind: str, attn_implementation: str = "sdpa", seed: int = 0, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, OPTConfig
    torch.manual_seed(seed)
    if kind == "opt":
        config = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                           max_position_embeddings=512, word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2,
                           eos_token_id=2, dropout=0.0)
    elif kind == "llama":  # grouped KV heads, like the embedded SmolLM2 (9 query / 3 KV heads)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                             pad_token_id=258, bos_token_id=256, eos_token_id=257, tie_word_embeddings=True)
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=512, bos_token_id=256,
                            eos_token_id=257, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        raise ValueError(kind)
    config._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation).to(dtype)
    model.eval()
    return model


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine makes multi-threaded kernels crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def byte_tokenizer():
    return ByteTokenizer()


def shared_data_or_skip() -> Path:
    path = Path(os.environ.get("ZO_DATA_DIR", SHARED_DATA))
    if not (path / "sst2").is_dir():
        pytest.skip(f"real task data not found at {path} (set ZO_DATA_DIR)")
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random-weight, two-layer LLaMA (grouped KV heads) saved with the embedded model's real tokenizer, so run.py
    can train end to end in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import models
    tokenizer = models.load_tokenizer(models.EMBEDDED_ALIAS)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def stall_hooks(tmp_path_factory):
    """A sitecustomize that, when ZO_TEST_STALL_SAVE=N is set, stalls the process right after it wrote optimizer.pt of
    checkpoint-N (the middle of a save) and touches $ZO_TEST_STALL_FLAG, so a test can SIGKILL it mid-save."""
    folder = tmp_path_factory.mktemp("hooks")
    (folder / "sitecustomize.py").write_text('''
import os
if os.environ.get("ZO_TEST_STALL_SAVE"):
    import pathlib, time, torch
    _save, _target = torch.save, "checkpoint-" + os.environ["ZO_TEST_STALL_SAVE"] + os.sep + "optimizer.pt"
    def _stalling_save(obj, f, *args, **kwargs):
        _save(obj, f, *args, **kwargs)
        if str(f).endswith(_target):
            pathlib.Path(os.environ["ZO_TEST_STALL_FLAG"]).touch()
            time.sleep(600)
    torch.save = _stalling_save
''')
    return folder
