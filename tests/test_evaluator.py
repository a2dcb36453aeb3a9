"""Batched, prefix-reusing scoring and generation must equal plain per-candidate, unbatched computation."""

import random

import pytest
import torch

from conftest import ByteTokenizer, tiny_model
from evaluator import EvalSettings, GenerationOptions, encode_prompt, generate_batch, predict, score_options
from models import TokenizerSettings


def unbatched_option_log_probs(model, sequence, option_len):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0].float()
    log_probs = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]
    return log_probs[len(log_probs) - option_len:]


def random_groups(rng, shared_prefix):
    """Examples with a shared demo prefix, own prompts and 2-5 candidates with options of 1-4 tokens."""
    groups = []
    for _ in range(7):
        prompt = shared_prefix + [rng.randrange(256) for _ in range(rng.randrange(1, 20))]
        candidates, lens = [], []
        for _ in range(rng.randrange(2, 6)):
            option = [rng.randrange(256) for _ in range(rng.randrange(1, 5))]
            candidates.append(prompt + option)
            lens.append(len(option))
        groups.append((candidates, lens))
    # candidates that diverge before the option (BPE merges across the boundary do this)
    groups.append(([[7, 8, 9, 10, 11], [7, 8, 12, 10, 11, 13]], [2, 3]))
    return groups


@pytest.mark.parametrize("kind,attn", [("opt", "sdpa"), ("llama", "sdpa"), ("llama", "eager"), ("gpt2", "sdpa")])
@pytest.mark.parametrize("shared", [0, 12])
def test_batched_scores_equal_unbatched(kind, attn, shared):
    model = tiny_model(kind, attn)
    rng = random.Random(shared)
    groups = random_groups(rng, [256] + [rng.randrange(256) for _ in range(shared)])
    batched = score_options(model, groups, pad_id=258, batch_size=3)
    for (sequences, lens), scores in zip(groups, batched):
        assert len(scores) == len(sequences)
        for sequence, n, got in zip(sequences, lens, scores):
            want = unbatched_option_log_probs(model, sequence, n)
            assert got.shape == (n,)
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_predictions_match_unbatched_and_break_ties_to_first(byte_tokenizer):
    class Task:
        class spec:
            name, generation, train_sep, metric = "Toy", False, "\n\n", "accuracy"

            @staticmethod
            def template():
                class T:
                    def encode(self, s):
                        return s.data["text"] + " It was"

                    def verbalize(self, s, c):
                        return s.data["text"] + " It was " + c

                return T()

    from tasks import Sample
    samples = [Sample(i, {"text": f"movie number {i} was {'good' if i % 2 else 'bad'}"}, ["terrible", "great", "great"],
                      "great") for i in range(9)]
    demos = samples[:2]
    model = tiny_model("llama")
    tokens = TokenizerSettings(bos_id=256, pad_id=258)
    records = predict(model, byte_tokenizer, tokens, Task, [demos] * len(samples), samples,
                      EvalSettings(batch_size=4))
    template = Task.spec.template()
    for sample, record in zip(samples, records):
        encoded = encode_prompt(template, "\n\n", demos, sample, byte_tokenizer, tokens, 2048)
        means = [unbatched_option_log_probs(model, s, n).mean().item()
                 for s, n in zip(encoded.sequences, encoded.option_lens)]
        assert record["predicted_candidate"] == max(range(len(means)), key=lambda j: (means[j], -j))
        # candidates 1 and 2 are identical: the tie must go to the first
        assert record["predicted_candidate"] != 2
        assert record["scores"] == pytest.approx(means, abs=1e-5)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_batched_generation_equals_unbatched(kind):
    model = tiny_model(kind, seed=3)
    tokenizer = ByteTokenizer()
    tokens = TokenizerSettings(bos_id=256, pad_id=258)
    rng = random.Random(1)
    prompts = [[256] + [rng.randrange(256) for _ in range(rng.randrange(3, 30))] for _ in range(5)]
    options = GenerationOptions(max_new_tokens=8, eos_token="\n")
    batched = generate_batch(model, tokenizer, tokens, prompts, options)
    single = [generate_batch(model, tokenizer, tokens, [p], options)[0] for p in prompts]
    assert batched == single


def test_encode_prompt_truncates_from_the_left_keeping_bos(byte_tokenizer):
    class T:
        def encode(self, s):
            return s.data

        def verbalize(self, s, c):
            return s.data + " " + c

    from tasks import Sample
    demo = Sample(0, "d" * 40, ["x"], "x")
    sample = Sample(1, "question", ["yes", "no"], "yes")
    tokens = TokenizerSettings(bos_id=256, pad_id=258)
    encoded = encode_prompt(T(), "\n\n", [demo, demo], sample, byte_tokenizer, tokens, max_length=30)
    for sequence, option_len, candidate in zip(encoded.sequences, encoded.option_lens, ["yes", "no"]):
        assert len(sequence) == 30 and sequence[0] == 256
        assert bytes(sequence[1:]).decode().endswith("question " + candidate)
        assert option_len == len(" " + candidate)
    no_bos = encode_prompt(T(), "\n\n", [demo], sample, ByteTokenizer(add_bos=False),
                           TokenizerSettings(bos_id=None, pad_id=258), max_length=20)
    assert all(len(s) == 20 and bytes(s).decode().endswith("question " + c)
               for s, c in zip(no_bos.sequences, ["yes", "no"]))
    # the longest candidate ("yes"): BOS, two demos "d..d x" with their separators, the question
    assert encoded.truncated == 1 + 2 * len("d" * 40 + " x\n\n") + len("question yes") - 30


def test_truncation_is_warned_once_per_phase_with_the_count(byte_tokenizer, caplog):
    from evaluator import Encoded, warn_truncated
    encoded = [Encoded([[1]], [1], truncated=n) for n in (0, 5, 0, 12)]
    warn_truncated(encoded, 30, "prompts")
    assert len(caplog.records) == 1
    assert "2 of 4 prompts exceeded --max_length 30 and were truncated from the left" in caplog.text
    assert "up to 12 tokens cut" in caplog.text
    caplog.clear()
    warn_truncated(encoded[:1], 30, "prompts")
    assert not caplog.records
