"""Training records: single-token candidates after a shared prompt become one row per example, with unchanged scores."""

import pytest
import torch

import models
import tasks
import utils
from conftest import shared_data_or_skip, tiny_model


def expanded(records):
    """The one-row-per-candidate form of compact records (what the suite builds for multi-token candidates)."""
    return [[{"input_ids": r["input_ids"] + [c], "option_len": 1, "labels": r["labels"],
              "num_options": r["num_options"]} for c in r["candidate_ids"]] for r in records]


@pytest.fixture(scope="module")
def real_tokens():
    tokenizer = models.load_tokenizer(models.EMBEDDED_ALIAS)
    return tokenizer, models.tokenizer_settings(tokenizer, tiny_model("llama").config)


def records_for(task_name, tokenizer, tokens, objective, count=6):
    task = tasks.load_task(task_name, str(shared_data_or_skip()))
    samples = task.sample_subset("train", 0, count)
    return utils.build_train_records(task, samples, tokenizer, tokens, objective, max_length=2048)


@pytest.mark.parametrize("task_name", ["SST2", "RTE"])
def test_single_token_candidates_share_one_row_and_keep_the_loss(task_name, real_tokens):
    tokenizer, tokens = real_tokens
    records = records_for(task_name, tokenizer, tokens, utils.Objective(classification=True))
    assert all(isinstance(r, dict) and len(r["candidate_ids"]) == r["num_options"] == 2 for r in records)
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tokenizer))
    torch.nn.init.normal_(model.get_input_embeddings().weight)
    collate = utils.TrainCollator(tokens.pad_id)
    compact, full = collate(records), collate(expanded(records))
    assert compact["input_ids"].shape[0] == len(records) and full["input_ids"].shape[0] == 2 * len(records)
    objective = utils.Objective(classification=True)
    with torch.no_grad():
        torch.testing.assert_close(utils.candidate_scores(model, compact), utils.candidate_scores(model, full),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(utils.training_loss(model, compact, objective),
                                   utils.training_loss(model, full, objective), rtol=1e-5, atol=1e-6)


def test_multi_token_candidates_keep_one_row_per_candidate(real_tokens):
    tokenizer, tokens = real_tokens
    records = records_for("Copa", tokenizer, tokens, utils.Objective(classification=True))
    assert all(isinstance(r, list) and len(r) == 2 for r in records)


def test_shared_prompt_check_rejects_differing_prompts_and_counts():
    from types import SimpleNamespace as Encoded
    same = Encoded(sequences=[[1, 2, 5], [1, 2, 6]], option_lens=[1, 1])
    assert utils.shared_prompt_single_tokens([same, same])
    assert not utils.shared_prompt_single_tokens([same, Encoded(sequences=[[1, 2, 5], [1, 3, 6]], option_lens=[1, 1])])
    assert not utils.shared_prompt_single_tokens([same, Encoded(sequences=[[1, 5], [1, 6, 7]], option_lens=[1, 2])])
    assert not utils.shared_prompt_single_tokens([same, Encoded(sequences=[[1, 5], [1, 6], [1, 7]],
                                                                option_lens=[1, 1, 1])])


def forwards_seen(model):
    """(use_cache argument, whether a cache came back) of every forward of `model`, recorded by a hook."""
    seen = []
    model.register_forward_hook(
        lambda module, args, kwargs, out: seen.append((kwargs.get("use_cache"),
                                                       getattr(out, "past_key_values", None) is not None)),
        with_kwargs=True)
    return seen


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2"])
def test_loss_forwards_build_no_kv_cache(kind):
    # a loss forward never reuses a cache; building one copies every layer's keys and values (7 % of an OPT-13B
    # forward at 16 x 256 tokens, 3.2 GB held until its end)
    import heads
    model = tiny_model(kind)
    seen = forwards_seen(model)
    rows = [{"input_ids": [5, 6, 7, 8, 9], "option_len": 2}, {"input_ids": [10, 11, 12], "option_len": 1}]
    batch = utils.TrainCollator(pad_id=0)(rows)
    utils.training_loss(model, batch, utils.Objective())
    utils.training_loss(model, batch, utils.Objective(only_option=False))
    compact = [{"input_ids": [5, 6, 7], "option_len": 0, "candidate_ids": [20, 21], "labels": 1, "num_options": 2}]
    utils.training_loss(model, utils.TrainCollator(pad_id=0)(compact), utils.Objective(classification=True))
    heads.collect_features(model, [batch])
    assert seen == [(False, False)] * 4
    # and the logits are those of a forward that fills a cache, bit for bit
    cached = model(**{k: batch[k] for k in utils.MODEL_INPUTS}, use_cache=True).logits
    assert torch.equal(utils.model_logits(model, batch), cached)
