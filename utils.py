"""Training data and losses shared by the regular and the ZO trainers.

A training example becomes token ids plus the number of trailing option (answer) tokens. Batches are left-padded so
options are right-aligned, which lets the loss run the LM head only on the last `max(option_len) + 1` positions.
With the classification objective, a task whose candidates are single tokens after one shared prompt (SST2's
"terrible"/"great", RTE's "Yes"/"No", ...) is encoded as that prompt once plus the candidate token ids: one row per
example instead of one per candidate, with the same scores (the log-probability of a one-token option is the
prompt's next-token distribution). Losses are computed in fp32 whatever the weight dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from evaluator import encode_prompt, warn_truncated


@dataclass
class Objective:
    """What a training batch optimises (MeZO's --train_as_classification / --only_train_option / --non_diff)."""
    classification: bool = False   # CE over candidates' length-normalised option log-likelihoods
    only_option: bool = True       # LM loss on the option tokens only (else on every token)
    non_diff: bool = False         # the model generates; the loss is minus a task metric (ZO only)


def correct_index(sample, generation: bool) -> int:
    if generation:
        return 0
    gold = sample.correct_candidate[0] if isinstance(sample.correct_candidate, list) else sample.correct_candidate
    return sample.candidates.index(gold)


def build_train_records(task, samples, tokenizer, tokens, objective: Objective, max_length: int,
                        max_new_tokens: int | None = None) -> list[Any]:
    """One record per sample (with the classification objective: the shared prompt plus candidate tokens, or a list of
    per-candidate records). No demos."""
    spec = task.spec
    template = spec.template()
    encoded_samples = [encode_prompt(template, spec.train_sep, [], sample, tokenizer, tokens, max_length,
                                     generation=spec.generation, generation_with_gold=True,
                                     max_new_tokens=max_new_tokens if objective.non_diff else None)
                       for sample in samples]
    warn_truncated(encoded_samples, max_length, "training examples")
    scores_candidates = objective.classification or (objective.non_diff and not spec.generation)
    if scores_candidates and shared_prompt_single_tokens(encoded_samples):
        return [{"input_ids": encoded.sequences[0][:-1], "option_len": 0,
                 "candidate_ids": [ids[-1] for ids in encoded.sequences],
                 "labels": correct_index(sample, spec.generation), "num_options": len(encoded.sequences)}
                for sample, encoded in zip(samples, encoded_samples)]
    records = []
    for sample, encoded in zip(samples, encoded_samples):
        gold = correct_index(sample, spec.generation)
        if scores_candidates:
            # the non-differentiable objective scores classification through the candidates' likelihoods
            records.append([{"input_ids": ids, "option_len": n, "labels": gold, "num_options": len(encoded.sequences)}
                            for ids, n in zip(encoded.sequences, encoded.option_lens)])
        elif objective.non_diff:  # generation: the prompt alone; the model must produce the answer itself
            ids, n = encoded.sequences[gold], encoded.option_lens[gold]
            records.append({"input_ids": ids[:len(ids) - n], "option_len": 0, "gold": sample.correct_candidate})
        else:
            records.append({"input_ids": encoded.sequences[gold], "option_len": encoded.option_lens[gold]})
    return records


def shared_prompt_single_tokens(encoded_samples) -> bool:
    """Whether every sample's candidates are one token each after an identical prompt, with one candidate count."""
    counts = {len(encoded.sequences) for encoded in encoded_samples}
    if len(counts) != 1:
        return False
    for encoded in encoded_samples:
        prompt = encoded.sequences[0][:-1]
        if any(n != 1 for n in encoded.option_lens) or any(ids[:-1] != prompt for ids in encoded.sequences):
            return False
    return True


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, records: list):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        return self.records[index]


@dataclass
class TrainCollator:
    """Left-pads (to a multiple of 8) and adds attention mask and explicit position ids."""
    pad_id: int
    pad_to_multiple_of: int = 8

    def __call__(self, features: list) -> dict[str, Any]:
        per_example = [f if isinstance(f, list) else [f] for f in features]
        rows = [row for group in per_example for row in group]
        width = max(len(r["input_ids"]) for r in rows)
        width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, width - n:] = torch.tensor(row["input_ids"])
            attention_mask[i, width - n:] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 # left padding: real tokens keep positions 0..n-1 (LLaMA would otherwise count the pads)
                 "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
                 "option_len": torch.tensor([r["option_len"] for r in rows])}
        if "candidate_ids" in rows[0]:
            batch["candidate_ids"] = torch.tensor([r["candidate_ids"] for r in rows])
        if "num_options" in rows[0]:
            batch["labels"] = torch.tensor([group[0]["labels"] for group in per_example])
            batch["num_options"] = torch.tensor([group[0]["num_options"] for group in per_example])
        if "gold" in rows[0]:
            batch["gold"] = [r["gold"] for r in rows]
        return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def model_logits(model, batch: dict, **kwargs) -> torch.Tensor:
    """The model's logits for a collated batch.  No KV cache: a loss forward never reuses one, and building it
    copies every layer's keys and values (on OPT-13B at 16 x 256 tokens, 3.2 GB held to the end of the forward and
    7 % of its time)."""
    return model(**{k: batch[k] for k in MODEL_INPUTS}, use_cache=False, **kwargs).logits


def option_log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (fp32) of the tokens each kept position predicts, and the mask of option tokens among them."""
    option_len = batch["option_len"]
    keep = int(option_len.max()) + 1
    logits = model_logits(model, batch, logits_to_keep=keep)
    targets = batch["input_ids"][:, -keep + 1:]
    log_probs = _at_least_fp32(logits[:, :-1]).log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    position = torch.arange(keep - 1, device=targets.device)
    is_option = position[None, :] >= (keep - 1 - option_len.to(targets.device))[:, None]
    return log_probs, is_option


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Token-mean cross-entropy over every real token (MeZO's plain LM loss)."""
    logits = _at_least_fp32(model_logits(model, batch)[:, :-1])
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def classification_loss_from_scores(scores: torch.Tensor, labels: torch.Tensor, num_options: torch.Tensor):
    """CE over each example's block of candidate scores (blocks may differ in size, e.g. ReCoRD)."""
    if bool((num_options == num_options[0]).all()):
        return F.cross_entropy(scores.view(len(labels), int(num_options[0])), labels.to(scores.device))
    losses, start = [], 0
    for label, count in zip(labels.tolist(), num_options.tolist()):
        losses.append(F.cross_entropy(scores[start:start + count][None], torch.tensor([label], device=scores.device)))
        start += count
    return torch.stack(losses).mean()


def candidate_scores(model, batch: dict) -> torch.Tensor:
    """Length-normalised log-likelihood (fp32) of every candidate, flat in example order."""
    if "candidate_ids" in batch:
        logits = model_logits(model, batch, logits_to_keep=1)[:, -1]
        candidates = batch["candidate_ids"].to(logits.device)
        return _at_least_fp32(logits).log_softmax(-1).gather(-1, candidates).reshape(-1)
    log_probs, is_option = option_log_probs(model, batch)
    return (log_probs * is_option).sum(-1) / is_option.sum(-1)


def loss_weight(batch: dict, objective: Objective) -> int:
    """What `training_loss` averages over in this batch: examples (classification, non-differentiable metrics) or
    tokens (the LM losses). Losses of several batches weighted by it average like one batch of all of them."""
    if objective.classification or objective.non_diff:
        return len(batch["labels"]) if "labels" in batch else len(batch["input_ids"])
    if not objective.only_option:
        return int(batch["attention_mask"][:, 1:].sum())
    return int(batch["option_len"].sum())


def training_loss(model, batch: dict, objective: Objective) -> torch.Tensor:
    if not objective.only_option:
        return lm_loss(model, batch)
    if objective.classification:
        return classification_loss_from_scores(candidate_scores(model, batch), batch["labels"], batch["num_options"])
    log_probs, is_option = option_log_probs(model, batch)
    return -(log_probs * is_option).sum() / is_option.sum()
