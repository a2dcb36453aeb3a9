"""Batched greedy generation equals per-example greedy generation token for token.

Two independent references: Hugging Face `generate` on one example at a time (what MeZO's evaluator does), and a
plain loop that reruns the whole sequence without a cache at every step and takes the first argmax. Stop tokens are
chosen among tokens the model really produces, so rows stop at different steps and leave the batch mid-way.
"""

import random

import pytest
import torch

import evaluator
from conftest import ByteTokenizer, shared_data_or_skip, tiny_model
from evaluator import (EvalSettings, GenerationOptions, encode_prompt, generate_batch, greedy_tokens, predict,
                       shared_prefix, stop_token_ids)
from models import TokenizerSettings

PAD = 258


def reference_generate(model, prompt, stops, budget, pad_id=PAD):
    """One example through `generate`: greedy, stops at any stop id; the tokens up to and including the stop."""
    if budget == 0:
        return []
    output = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                                        dtype=torch.long),
                            do_sample=False, num_beams=1, max_new_tokens=budget, eos_token_id=list(stops),
                            pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    row = output[0, len(prompt):].tolist()
    ends = [i for i, t in enumerate(row) if t in stops]
    return row[:ends[0] + 1] if ends else row


@torch.no_grad()
def reference_no_cache(model, prompt, stops, budget):
    """Full forward over prompt + tokens so far at every step, no cache, no padding."""
    sequence, new = list(prompt), []
    while len(new) < budget:
        token = int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax())
        new.append(token)
        sequence.append(token)
        if token in stops:
            break
    return new


def sharp(model):
    """Random tiny models attend almost uniformly, so a wrong position or an unmasked padding column barely changes
    their output; larger query/key weights make attention peaked, and such mistakes visible."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("q_proj", "k_proj", "c_attn")):
                parameter.mul_(6.0)
    return model


def prompts_and_stops(model, seed=1, count=7, shared=(), short=()):
    """Prompts of 3-30 random bytes after BOS (and an optional shared start); the stop set is EOS and a token the
    model generates within its first 8 tokens for some prompts but not for others, so some rows stop early and others
    run to their budget (prompts listed in `short`, given a budget of 0 or 1, do not count)."""
    rng = random.Random(seed)
    prompts = [[256, *shared] + [rng.randrange(256) for _ in range(rng.randrange(3, 30))] for _ in range(count)]
    free = [reference_no_cache(model, prompt, (), 10) for i, prompt in enumerate(prompts) if i not in short]
    counts = {}
    for tokens in free:
        for token in set(tokens[1:8]):
            counts[token] = counts.get(token, 0) + 1
    splitting = [t for t in sorted(counts, key=lambda t: (-counts[t], t)) if counts[t] < len(free)]
    return prompts, (splitting or sorted(counts))[:1] + [257]


@pytest.mark.parametrize("kind,attn", [("opt", "sdpa"), ("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
def test_batched_greedy_equals_per_example(kind, attn):
    model = sharp(tiny_model(kind, attn, seed=3))
    prompts, stops = prompts_and_stops(model, short=(3, 4))
    budgets = [12, 9, 12, 0, 1, 12, 9]
    want = [reference_generate(model, p, stops, b) for p, b in zip(prompts, budgets)]
    assert want == [reference_no_cache(model, p, stops, b) for p, b in zip(prompts, budgets)]
    # all rows in one pool, and pools of 2 and 3 that finished rows leave and waiting prompts join
    for batch_size in (None, 2, 3):
        done = []
        got = greedy_tokens(model, prompts, stops, budgets, batch_size=batch_size, on_done=done.append)
        assert got == want, batch_size
        assert sum(done) == len(prompts)
    # the test means something only if rows left the batch at different steps
    stopped_early = [len(g) < b for g, b in zip(got, budgets) if b > 1]
    assert any(stopped_early) and not all(stopped_early), (got, stops)
    assert got[3] == [] and len(got[4]) == 1


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_shared_prefix_generation_equals_per_example(kind):
    model = sharp(tiny_model(kind, seed=5))
    rng = random.Random(2)
    demos = [rng.randrange(256) for _ in range(40)]
    prompts, stops = prompts_and_stops(model, seed=3, count=6, shared=demos)
    prefix = shared_prefix(model, prompts, min_length=1)
    assert prefix is not None and prefix.length >= 41
    budgets = [10] * len(prompts)
    got = greedy_tokens(model, prompts, stops, budgets, prefix, batch_size=4)
    assert got == [reference_generate(model, p, stops, b) for p, b in zip(prompts, budgets)]
    # the prefix cache is copied, never consumed: a second batch from it gives the same
    assert greedy_tokens(model, prompts[:3], stops, budgets[:3], prefix) == got[:3]


def test_shared_prefix_keeps_a_token_of_every_prompt():
    model = tiny_model("llama")
    same = [256] + list(range(30))
    prefix = shared_prefix(model, [same, same], min_length=1)
    assert prefix.length == len(same) - 1
    assert shared_prefix(model, [same, same[:10] + [5]], min_length=16) is None  # too short to be worth a copy
    assert shared_prefix(model, [same], min_length=1) is None                   # one prompt: nothing to share


@pytest.mark.parametrize("mode", ["prefix", "lora"])
def test_parameter_efficient_models_generate_as_per_example(mode):
    """Prefix tuning puts its keys in the cache through a hook; LoRA wraps the model in a peft PeftModel."""
    model = sharp(tiny_model("llama", seed=4))
    if mode == "prefix":
        from prefix import apply_prefix_tuning
        model = apply_prefix_tuning(model, num_prefix=3)
        with torch.no_grad():  # a prefix far from its initialisation, so that it changes what is generated
            for p in model.prefix_tuning.parameters():
                p.add_(torch.randn_like(p))
    else:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    prompts, stops = prompts_and_stops(model, seed=6, count=5, shared=list(range(20, 40)))
    budgets = [8] * len(prompts)
    want = [reference_no_cache(model, p, stops, b) for p, b in zip(prompts, budgets)]
    assert greedy_tokens(model, prompts, stops, budgets, batch_size=2) == want
    assert greedy_tokens(model, prompts, stops, budgets, shared_prefix(model, prompts, min_length=1), 3) == want
    assert want == [reference_generate(model, p, stops, b) for p, b in zip(prompts, budgets)]


def test_generate_batch_decodes_up_to_the_stop_and_keeps_each_prompts_budget():
    model = tiny_model("opt", seed=3)
    tokenizer, tokens = ByteTokenizer(), TokenizerSettings(bos_id=256, pad_id=PAD)
    prompts, stops = prompts_and_stops(model)
    options = GenerationOptions(max_new_tokens=12, eos_token=chr(stops[0]) if stops[0] < 128 else "\n",
                                max_length=30)
    texts = generate_batch(model, tokenizer, tokens, prompts, options)
    # max_length 30 leaves a 29-token prompt one new token: the reference's per-example budget, not the batch's
    budgets = [min(12, 30 - len(p)) for p in prompts]
    stop_ids = stop_token_ids(tokenizer, tokens, options.eos_token)
    want = [tokenizer.decode(reference_generate(model, p, stop_ids, b), skip_special_tokens=True).strip()
            for p, b in zip(prompts, budgets)]
    assert texts == want


@pytest.mark.parametrize("beams", [1, 2])
def test_sampling_and_beams_still_go_through_generate(beams):
    model = tiny_model("llama", seed=3)
    tokenizer, tokens = ByteTokenizer(), TokenizerSettings(bos_id=256, pad_id=PAD)
    prompts, _ = prompts_and_stops(model, count=3)
    options = GenerationOptions(max_new_tokens=6, sampling=beams == 1, num_beams=beams)
    torch.manual_seed(0)
    first = generate_batch(model, tokenizer, tokens, prompts, options)
    torch.manual_seed(0)
    assert generate_batch(model, tokenizer, tokens, prompts, options) == first
    assert all(len(t.encode()) <= 6 * 4 for t in first)


def test_embedded_model_on_real_squad_rows():
    """The embedded SmolLM2 on real SQuAD validation rows, zero-shot and with a shared demonstration set: predict's
    batched generations equal MeZO-style per-example `generate`."""
    data = shared_data_or_skip()
    import models
    import tasks
    if models.model_name_problem(models.EMBEDDED_ALIAS):
        pytest.skip("the embedded model is not installed")
    task = tasks.load_task("SQuAD", str(data))
    tokenizer = models.load_tokenizer(models.EMBEDDED_ALIAS)
    model = models.load_model(models.EMBEDDED_ALIAS)
    tokens = models.tokenizer_settings(tokenizer, model.config)
    samples = task.sample_subset("validation", 0, 6)
    demos = task.sample_subset("train", 0, 1)
    options = GenerationOptions(max_new_tokens=12)
    settings = EvalSettings(batch_size=4, generation=options)
    template = task.spec.template()
    stops = stop_token_ids(tokenizer, tokens, options.eos_token)
    for demo_sets in ([[]] * len(samples), [demos] * len(samples)):
        records = predict(model, tokenizer, tokens, task, demo_sets, samples, settings)
        for record, demo_set, sample in zip(records, demo_sets, samples):
            ids = encode_prompt(template, task.spec.train_sep, demo_set, sample, tokenizer, tokens, 2048,
                                generation=True, max_new_tokens=12).sequences[0]
            want = reference_generate(model, ids, stops, 12, tokens.pad_id)
            assert record["predicted_candidate"] == tokenizer.decode(want, skip_special_tokens=True).strip()



def test_caches_that_cannot_be_merged_row_by_row_fall_back_to_generate(monkeypatch):
    """A sliding-window model's cache keeps only its window: it is decoded through `generate`, with the same
    result as per-example decoding."""
    from transformers import AutoModelForCausalLM, MistralConfig
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, sliding_window=8, pad_token_id=PAD,
                           bos_token_id=256, eos_token_id=257)
    model = AutoModelForCausalLM.from_config(config).eval()
    prompts, stops = prompts_and_stops(model, count=4)
    with pytest.raises(evaluator.CacheNotPoolable):
        greedy_tokens(model, prompts, stops, [6] * 4)
    tokenizer, tokens = ByteTokenizer(), TokenizerSettings(bos_id=256, pad_id=PAD)
    options = GenerationOptions(max_new_tokens=6, eos_token=chr(stops[0]) if stops[0] < 128 else "\n")
    stop_ids = stop_token_ids(tokenizer, tokens, options.eos_token)
    done = []
    texts = generate_batch(model, tokenizer, tokens, prompts, options, batch_size=3, on_done=done.append)
    assert done == [3, 1]
    assert texts == [tokenizer.decode(reference_generate(model, p, stop_ids, 6), skip_special_tokens=True).strip()
                     for p in prompts]
