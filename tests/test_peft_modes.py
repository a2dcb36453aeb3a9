"""LoRA (lora.py) and prefix tuning (prefix.py) on tiny OPT, LLaMA (grouped KV heads) and GPT-2 models: what trains,
what stays frozen, save/load round trips, and that the adapted models still fit the evaluator's batched, cached,
explicitly positioned calls and `generate`."""

import copy
import random

import pytest
import torch
import torch.nn.functional as F

import evaluator
import lora
import prefix
from conftest import VOCAB, tiny_model

KINDS = ["opt", "llama", "gpt2"]
PAD = 258



def adapt(kind, mode, dtype=torch.float32, **kwargs):
    model = tiny_model(kind, dtype=dtype)
    if mode == "lora":
        return lora.apply_lora(model, r=4, alpha=8, **kwargs)
    if mode == "prefix":
        return prefix.apply_prefix_tuning(model, num_prefix=3, **kwargs)
    if mode == "prefix_reparam":
        return prefix.apply_prefix_tuning(model, num_prefix=3, reparam=True, init_by_real_act=False, **kwargs)
    raise ValueError(mode)


def sgd_steps(model, steps=3, lr=0.5, seed=0):
    """Plain next-token CE on random tokens, torch SGD over the trainable parameters."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 256, (2, 8), generator=gen)
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def random_groups(seed=0, shared=6, n=5):
    """Examples sharing a demo prefix (so the evaluator reuses a shared cache), each with 2-3 candidates."""
    rng = random.Random(seed)
    head = [256] + [rng.randrange(256) for _ in range(shared)]
    groups = []
    for _ in range(n):
        prompt = head + [rng.randrange(256) for _ in range(rng.randrange(1, 8))]
        candidates = [prompt + [rng.randrange(256) for _ in range(rng.randrange(1, 4))]
                      for _ in range(rng.randrange(2, 4))]
        groups.append((candidates, [len(c) - len(prompt) for c in candidates]))
    return groups


def unbatched_scores(model, groups):
    """Reference: one plain forward per sequence, no cache, no mask, no explicit positions."""
    out = []
    for sequences, lens in groups:
        scores = []
        for seq, n in zip(sequences, lens):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([seq])).logits[0].float()
            lp = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(seq[1:])[:, None])[:, 0]
            scores.append(lp[len(lp) - n:])
        out.append(scores)
    return out


def assert_scores_close(got, want, atol=2e-5, rtol=1e-4):
    for g_group, w_group in zip(got, want, strict=True):
        for g, w in zip(g_group, w_group, strict=True):
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol)


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


# --- both modes -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,kind",
                         [(m, k) for m in ("lora", "prefix") for k in KINDS] + [("prefix_reparam", "llama")])
def test_only_adapter_parameters_train(mode, kind):
    model = adapt(kind, mode)
    names = trainable_names(model)
    marker = "lora_" if mode == "lora" else "prefix"
    assert names and all(marker in n for n in names)
    assert {n for n, _ in model.named_parameters() if marker in n} == names
    before = copy.deepcopy(model)
    sgd_steps(model)
    old = dict(before.named_parameters())
    for name, p in model.named_parameters():
        if name in names:
            assert not torch.equal(p, old[name]), f"{name} did not train"
        else:
            assert torch.equal(p, old[name]), f"frozen {name} changed"


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_bf16_forward_and_step(mode):
    model = adapt("llama", mode, dtype=torch.bfloat16)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)  # fp32 master copies for ZO perturbations
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all(p.dtype == torch.bfloat16 for p in frozen.values())
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[256, 5, 6, 7]])).logits.dtype == torch.bfloat16
    before = [p.clone() for p in trained]
    sgd_steps(model, steps=2)
    assert all(not torch.equal(a, b) for a, b in zip(before, trained))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("mode", ["lora", "prefix"])
def test_adapted_model_keeps_the_evaluator_interface(mode):
    from peft import PeftModel
    from transformers import PreTrainedModel
    model = adapt("llama", mode)
    # LoRA: peft's wrapper, which forwards everything to the model (and the HF Trainer knows how to checkpoint)
    assert isinstance(model, PeftModel if mode == "lora" else PreTrainedModel) and model.config.model_type == "llama"
    assert evaluator.cache_keyword(model) == "cache"  # no fallback to the deprecated past_key_values keyword
    assert model.get_input_embeddings().num_embeddings == VOCAB
    ids = torch.tensor([[256, 1, 2, 3], [PAD, 256, 4, 5]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                    use_cache=True)
        step = model(input_ids=torch.tensor([[6], [7]]), attention_mask=torch.cat([mask, torch.ones(2, 1).long()], 1),
                     position_ids=torch.tensor([[4], [3]]), cache=out.cache, use_cache=True, logits_to_keep=1)
    assert step.logits.shape == (2, 1, VOCAB) and step.cache is not None
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                               pad_token_id=PAD)
    assert generated.shape == (2, 7)


# --- LoRA -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_fresh_lora_equals_base_model(kind):
    base = tiny_model(kind)
    rng_state = torch.get_rng_state()
    model = adapt(kind, "lora")
    assert torch.equal(torch.get_rng_state(), rng_state)  # A is drawn under a forked, seeded RNG
    again = lora.lora_parameters(adapt(kind, "lora"))
    assert all(torch.equal(p, again[n]) for n, p in lora.lora_parameters(model).items())
    assert all(torch.count_nonzero(p) == 0 for n, p in model.named_parameters() if "lora_B" in n)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("kind", KINDS)
def test_lora_adapter_and_merged_round_trips(kind, tmp_path):
    from transformers import AutoModelForCausalLM
    groups = random_groups()
    model = adapt(kind, "lora")
    fresh = evaluator.score_options(model, groups, PAD, batch_size=2)
    sgd_steps(model)
    trained = evaluator.score_options(model, groups, PAD, batch_size=2)
    assert not torch.allclose(torch.cat(fresh[0]), torch.cat(trained[0]), atol=1e-4)  # training moved the scores
    assert_scores_close(trained, unbatched_scores(model, groups))

    lora.save_adapter(model, tmp_path / "adapter")
    reloaded = lora.load_adapter(tiny_model(kind), tmp_path / "adapter")
    assert trainable_names(reloaded) == trainable_names(model)
    assert_scores_close(evaluator.score_options(reloaded, groups, PAD, batch_size=2), trained, atol=0, rtol=0)
    in_place = lora.load_adapter(adapt(kind, "lora", seed=5), tmp_path / "adapter")  # e.g. resuming a run
    assert_scores_close(evaluator.score_options(in_place, groups, PAD, batch_size=2), trained, atol=0, rtol=0)
    with pytest.raises(ValueError, match="r=4, alpha=8"):
        lora.load_adapter(lora.apply_lora(tiny_model(kind), r=2, alpha=8), tmp_path / "adapter")

    lora.save_merged(model, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert_scores_close(evaluator.score_options(merged, groups, PAD, batch_size=2), trained, atol=1e-5, rtol=1e-5)


def test_lora_errors_name_the_model_type_and_flag():
    model = tiny_model("opt")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match=r"(?s)'mystery'.*--lora_target_modules"):
        lora.apply_lora(model)
    with pytest.raises(ValueError, match="nonexistent_proj"):
        lora.apply_lora(model, target_modules=["q_proj", "nonexistent_proj"])
    adapted = lora.apply_lora(model, target_modules=["k_proj"])  # explicit targets work for any model type
    assert trainable_names(adapted) and all(".k_proj.lora_" in n for n in trainable_names(adapted))
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.apply_lora(adapted)


# --- prefix tuning --------------------------------------------------------------------------------------------------

def prefilled_cache(model, batch=1):
    """A cache holding the model's prefix, built by hand from the parameters (independent of the hook)."""
    from transformers import DynamicCache
    module = model.prefix_tuning
    cache = DynamicCache(config=model.config)
    for layer in range(module.num_layers):
        k, v = (t.detach()[None].expand(batch, -1, -1, -1) for t in module.layer_kv(layer))
        cache.update(k, v, layer)
    return cache


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_forward_equals_explicit_prefilled_cache(kind):
    """The prefix is P extra key/value slots and consumes no positions: real tokens sit at 0..L-1."""
    model = adapt(kind, "prefix")
    base = tiny_model(kind)
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = base(input_ids=ids, cache=prefilled_cache(model), attention_mask=torch.ones(1, 12, dtype=torch.long),
                    position_ids=torch.arange(9)[None]).logits
        got = model(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert (got - plain).abs().max() > 1e-3  # a real-activation prefix changes the output


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_evaluator_scores_equal_unbatched(kind):
    model = adapt(kind, "prefix")
    sgd_steps(model, steps=1)
    groups = random_groups(seed=3)
    # batch 2: several batches, each reusing the shared-demo cache and per-group caches, with left padding
    assert_scores_close(evaluator.score_options(model, groups, PAD, batch_size=2), unbatched_scores(model, groups))


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_left_padded_batch_equals_rows(kind):
    model = adapt(kind, "prefix")
    rows = [[256, 11, 12, 13, 14, 15, 16], [256, 21, 22], [256, 31, 32, 33, 34]]
    ids, mask = evaluator.left_pad(rows, PAD, "cpu")
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).logits  # positions come from the mask
        for i, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(batched[i, -len(row):], alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_generation_with_cache_equals_without(kind):
    model = adapt(kind, "prefix")
    ids, mask = evaluator.left_pad([[256, 5, 6, 7, 8, 9], [256, 10, 11]], PAD, "cpu")
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=PAD, eos_token_id=None, output_scores=True,
                  return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **kwargs)
        uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    beams = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **beams),
                           model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **beams))
    # and each step's scores are those of a plain forward over prompt + generated tokens so far
    for step, scores in enumerate(cached.scores):
        seq = cached.sequences[:, :ids.shape[1] + step]
        full_mask = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], dim=1)
        with torch.no_grad():
            logits = model(input_ids=seq, attention_mask=full_mask).logits[:, -1]
        torch.testing.assert_close(scores, logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_real_activation_init(kind):
    base = tiny_model(kind)
    rng_state = torch.get_rng_state()
    model = adapt(kind, "prefix", seed=7)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is neither used nor reseeded
    reparam = adapt(kind, "prefix_reparam", seed=7)
    assert torch.equal(torch.get_rng_state(), rng_state)
    twin = adapt(kind, "prefix_reparam", seed=7)
    assert torch.equal(reparam.prefix_tuning.prefix_embeds, twin.prefix_tuning.prefix_embeds)
    module = model.prefix_tuning
    tokens = torch.randint(0, VOCAB, (1, 3), generator=torch.Generator().manual_seed(7))
    assert module.init_token_ids == tokens[0].tolist()  # exactly P tokens: no BOS
    assert adapt(kind, "prefix", seed=8).prefix_tuning.init_token_ids != module.init_token_ids
    with torch.no_grad():
        cache = base(input_ids=tokens, use_cache=True).cache
    kv_heads = {"opt": 4, "llama": 2, "gpt2": 4}[kind]  # LLaMA: 2 KV heads for 6 query heads
    for layer in range(module.num_layers):
        assert module.prefix_keys[layer].shape == (kv_heads, 3, cache.layers[layer].keys.shape[-1])
        assert torch.equal(module.prefix_keys[layer], cache.layers[layer].keys[0])
        assert torch.equal(module.prefix_values[layer], cache.layers[layer].values[0])


def test_prefix_save_load_round_trip(tmp_path):
    model = adapt("llama", "prefix")
    sgd_steps(model, steps=2)
    ids = torch.tensor([[256, 3, 4, 5, 6]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    twin = copy.deepcopy(model)  # the copy's hooks must use the copy's prefix
    with torch.no_grad():
        twin.prefix_tuning.prefix_values[0].zero_()
        assert torch.equal(model(input_ids=ids).logits, want)
        assert not torch.allclose(twin(input_ids=ids).logits, want, atol=1e-4)
    prefix.save_prefix(model, tmp_path)
    loaded = prefix.load_prefix(tiny_model("llama"), tmp_path)
    assert trainable_names(loaded) == trainable_names(model)
    in_place = prefix.load_prefix(adapt("llama", "prefix", seed=3), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want)
        assert torch.equal(in_place(input_ids=ids).logits, want)
    with pytest.raises(ValueError, match="trained on a 'llama' model"):
        prefix.load_prefix(tiny_model("opt"), tmp_path)


def test_prefix_errors():
    model = tiny_model("opt")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="'mystery'"):
        prefix.apply_prefix_tuning(model)
    with pytest.raises(ValueError, match="init_by_real_act=False"):
        prefix.apply_prefix_tuning(tiny_model("llama"), reparam=True)
    adapted = adapt("llama", "prefix")
    with pytest.raises(ValueError, match="already has a prefix"):
        prefix.apply_prefix_tuning(adapted)
    with pytest.raises(ValueError, match="attention_mask has 2 columns"):
        adapted(input_ids=torch.tensor([[256, 1, 2, 3]]), attention_mask=torch.ones(1, 2, dtype=torch.long))
    adapted.activation_checkpointing_enable()
    adapted.train()
    with pytest.raises(ValueError, match="checkpointing"):
        adapted(input_ids=torch.tensor([[256, 1, 2, 3]]))


# --- the adapter table ----------------------------------------------------------------------------------------------

def test_each_mode_is_one_table_entry_that_recognises_exports_and_loads_its_models(tmp_path):
    import heads
    from adapters import ADAPTERS, adapter_of
    from conftest import ROOT
    assert adapter_of(tiny_model("llama")) is None
    models = {"lora": adapt("llama", "lora"), "prefix": adapt("llama", "prefix")}
    models["head"] = tiny_model("llama")
    heads.enable_head_tuning(models["head"])
    for name, model in models.items():
        assert adapter_of(model) is ADAPTERS[name]
    assert ADAPTERS["lora"].export(models["lora"], str(tmp_path / "lora"), False)
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert ADAPTERS["prefix"].export(models["prefix"], str(tmp_path / "prefix"), False)
    assert ADAPTERS["prefix"].in_checkpoint(str(tmp_path / "prefix")) and not ADAPTERS["prefix"].in_checkpoint(
        str(tmp_path / "lora"))
    reloaded = ADAPTERS["prefix"].checkpoint_load(adapt("llama", "prefix", seed=3), str(tmp_path / "prefix"))
    assert all(torch.equal(a, b) for a, b in zip(prefix.prefix_module(reloaded).parameters(),
                                                 prefix.prefix_module(models["prefix"]).parameters()))
    assert not ADAPTERS["head"].export(models["head"], str(tmp_path / "head"), False)  # the full model is saved
    # the flow and the trainer go through the table: neither names a mode's module
    for source in ("run.py", "trainer_zo.py"):
        text = (ROOT / source).read_text()
        assert "import lora" not in text and "import prefix" not in text and "enable_head_tuning" not in text, source
