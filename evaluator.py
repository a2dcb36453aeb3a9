"""Zero-shot / in-context-learning evaluation: prompt encoding, batched option scoring, batched generation.

Scoring follows the reference exactly (mean option log-prob; SFC as a difference of sums; first argmax on ties) but
computes it quickly:
* the token prefix shared by every sequence of the evaluation (e.g. a shared demonstration set) runs once;
* the prefix shared by one example's candidates runs once per example, batched across examples;
* only each candidate's remaining tokens run per candidate, batched, reusing those prefixes' key/value caches;
* the LM head runs only on the positions that predict option tokens.
Padding uses attention masks and explicit position ids, so every number equals unbatched, per-candidate scoring up to
floating-point round-off (tests/test_evaluator.py checks this).
"""

from __future__ import annotations

import copy
import inspect
import logging
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

import parallel
from metrics import Prediction, calculate_metric
from models import TokenizerSettings, model_device

logger = logging.getLogger(__name__)


def progress(iterable: Iterable, *, total: int, desc: str, unit: str, enabled: bool = True):
    """A progress bar with the rate and an ETA (on stderr). Where stderr is not a terminal (logs, batch jobs) it
    writes a line at most every 30 s instead of redrawing many times a second, and its final line stays in the log;
    on a terminal it is cleared when done, so bars of dev evaluations do not pile up under the training bar."""
    if not enabled:
        return iterable
    interactive = sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=not interactive, dynamic_ncols=True,
                mininterval=0.2 if interactive else 30.0, file=sys.stderr)


# --- prompt encoding (reference §7.2) ------------------------------------------------------------------------------

class PromptTooLong(ValueError):
    """An example whose answer does not fit in --max_length (the message says by how much and the fix)."""


@dataclass
class Encoded:
    sequences: list[list[int]]   # one token list per candidate (generation: the prompt)
    option_lens: list[int]       # trailing tokens of each sequence that form the option/answer
    texts: list[str] = field(default_factory=list)
    truncated: int = 0           # tokens cut from the left of the longest sequence to fit the length limit


def warn_truncated(encoded: Sequence[Encoded], limit: int, what: str) -> None:
    """One warning for all the prompts of a phase that were cut to fit (never silently, never once per example)."""
    cut = [e.truncated for e in encoded if e.truncated]
    if cut:
        logger.warning("!!! %d of %d %s exceeded --max_length %d and were truncated from the left (oldest "
                       "demonstrations first; up to %d tokens cut). Raise --max_length to keep them whole.", len(cut),
                       len(encoded), what, limit, max(cut))


def encode_prompt(template, train_sep: str, demos: Sequence, sample, tokenizer, tokens: TokenizerSettings,
                  max_length: int, *, sfc: bool = False, icl_sfc: bool = False, generation: bool = False,
                  generation_with_gold: bool = False, max_new_tokens: int | None = None) -> Encoded:
    demo_text = train_sep.join(template.verbalize(d, d.correct_candidate).strip() for d in demos).strip()
    calibrate = sfc or icl_sfc
    encode = template.encode_sfc if calibrate else template.encode
    verbalize = template.verbalize_sfc if calibrate else template.verbalize
    # Only spaces are stripped: templates whose prompt ends in "\n" keep it.
    unverbalized = encode(sample).strip(" ")

    def with_demos(text: str) -> str:
        return text if sfc else (demo_text + train_sep + text).lstrip().strip(" ")

    if generation:
        if calibrate:
            raise ValueError("SFC calibration (--sfc/--icl_sfc) only applies to classification tasks, "
                             "not to generation tasks; drop the flag.")
        if generation_with_gold:
            verbalized = verbalize(sample, sample.correct_candidate).strip(" ")
            option_lens = [len(tokens.encode(tokenizer, verbalized)) - len(tokens.encode(tokenizer, unverbalized))]
            texts = [with_demos(verbalized)]
        else:
            option_lens, texts = [0], [with_demos(unverbalized)]
    else:
        prompt_len = len(tokens.encode(tokenizer, unverbalized))
        texts, option_lens = [], []
        for candidate in sample.candidates:
            verbalized = verbalize(sample, candidate).strip(" ")
            option_lens.append(len(tokens.encode(tokenizer, verbalized)) - prompt_len)
            texts.append(with_demos(verbalized))

    limit = max_length - (max_new_tokens or 0) if generation else max_length
    sequences, truncated = [], 0
    for text, option_len in zip(texts, option_lens):
        ids = tokens.encode(tokenizer, text)
        if len(ids) > limit:
            truncated = max(truncated, len(ids) - limit)
            ids = ids[:1] + ids[len(ids) - limit + 1:] if tokens.bos_id is not None else ids[len(ids) - limit:]
        if option_len >= len(ids):
            raise PromptTooLong(f"An example's option ({option_len} tokens) does not fit in --max_length {limit}"
                                f"{' minus --max_new_tokens' if generation and max_new_tokens else ''}; raise "
                                f"--max_length.")
        sequences.append(ids)
    return Encoded(sequences, option_lens, texts, truncated)


# --- batched option scoring -----------------------------------------------------------------------------------------

def _common_prefix_len(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for other in sequences[1:]:
        i = 0
        while i < length and other[i] == first[i]:
            i += 1
        length = i
    return length


def _prefix_limit(sequences, option_lens) -> int:
    """Longest prefix that may be cached: the logit predicting each first option token must stay in the suffix."""
    return min(len(s) - n - 1 for s, n in zip(sequences, option_lens))


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token rows right-aligned in one block, pad_id and mask 0 on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row)
            mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def cache_keyword(model) -> str:
    """transformers renamed the `past_key_values` argument/output to `cache`; support both spellings. A peft
    `PeftModel` (LoRA) passes every keyword to the model it wraps, whose signature is the one that counts."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _positions(mask: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Position ids continuing from `start` (per row) over the real tokens of a left-padded block."""
    return (start[:, None] + mask.cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def score_options(model, groups: list[tuple[list[list[int]], list[int]]], pad_id: int,
                  batch_size: int = 8, show_progress: bool = False) -> list[list[torch.Tensor]]:
    """Log-probs of each sequence's option tokens, as fp32 CPU tensors, grouped like the input.

    `groups` holds one (sequences, option_lens) pair per example; sequences of a group share their prompt, so the
    prompt runs once per group.
    """
    device = model_device(model)
    all_sequences = [s for seqs, _ in groups for s in seqs]
    all_lens = [n for _, lens in groups for n in lens]
    group_prefix = [min(_common_prefix_len(seqs), _prefix_limit(seqs, lens)) for seqs, lens in groups]
    # The evaluation-wide prefix leaves every group at least one token of its own, so no row is all padding.
    shared_len = min(_common_prefix_len(all_sequences), _prefix_limit(all_sequences, all_lens), min(group_prefix) - 1)
    shared_len = max(shared_len, 0)
    cache_name = cache_keyword(model)
    shared_cache = None
    if shared_len > 0:
        out = model(input_ids=torch.tensor([all_sequences[0][:shared_len]], device=device), use_cache=True)
        shared_cache = getattr(out, cache_name)

    results: list[list[torch.Tensor] | None] = [None] * len(groups)
    order = sorted(range(len(groups)), key=lambda g: -max(len(s) for s in groups[g][0]))
    bar = progress(None, total=len(groups), desc="Scoring", unit="prompt", enabled=show_progress)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        # Stage 1: each group's own prompt part, after the shared prefix.
        cache = None
        prefix_mask = torch.ones((len(batch), shared_len), dtype=torch.long, device=device)
        if shared_cache is not None:
            cache = copy.deepcopy(shared_cache)
            cache.batch_repeat_interleave(len(batch))
        own = [groups[g][0][0][shared_len:group_prefix[g]] for g in batch]
        ids, mask = left_pad(own, pad_id, device)
        full_mask = torch.cat([prefix_mask, mask], dim=1)
        out = model(input_ids=ids, attention_mask=full_mask, use_cache=True, **{cache_name: cache},
                    position_ids=_positions(mask, torch.full((len(batch),), shared_len, device=device)),
                    logits_to_keep=1)
        cache = getattr(out, cache_name)

        # Stage 2: every candidate's remaining tokens, with its group's cache rows.
        rows, row_group, row_lens, row_starts = [], [], [], []
        for slot, g in enumerate(batch):
            for seq, n in zip(*groups[g]):
                rows.append(seq[group_prefix[g]:])
                row_group.append(slot)
                row_lens.append(n)
                row_starts.append(group_prefix[g])
        cache.batch_select_indices(torch.tensor(row_group, device=device))
        ids, mask = left_pad(rows, pad_id, device)
        keep = max(row_lens) + 1
        out = model(input_ids=ids, attention_mask=torch.cat([full_mask[row_group], mask], dim=1), use_cache=True,
                    **{cache_name: cache}, position_ids=_positions(mask, torch.tensor(row_starts, device=device)),
                    logits_to_keep=keep)
        log_probs = out.logits.float().log_softmax(-1)          # (rows, keep, vocab)
        targets = ids[:, -keep + 1:] if keep > 1 else ids[:, :0]  # tokens predicted by the kept positions
        picked = log_probs[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        row = 0
        for g in batch:
            scores = []
            for n in groups[g][1]:
                scores.append(picked[row, picked.shape[1] - n:] if n else picked[row, :0])
                row += 1
            results[g] = scores
        if show_progress:
            bar.update(len(batch))
    if show_progress:
        bar.close()
    return results  # type: ignore[return-value]


# --- generation -----------------------------------------------------------------------------------------------------

def stop_token_ids(tokenizer, tokens: TokenizerSettings, eos_token: str) -> list[int]:
    ids = tokenizer(eos_token, add_special_tokens=False)["input_ids"]
    stops = [ids[-1]] if ids else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    return stops


@dataclass
class GenerationOptions:
    max_new_tokens: int = 50
    sampling: bool = False
    temperature: float = 1.0
    num_beams: int = 1
    top_p: float = 0.95
    top_k: int | None = None
    max_length: int = 2048
    eos_token: str = "\n"


def _budgets(prompts: list[list[int]], options: GenerationOptions) -> list[int]:
    """New tokens each prompt may get: --max_new_tokens, or less where the prompt leaves less room in --max_length
    (the reference's per-example `min(max_new_tokens, max_length - len(ids))`)."""
    return [max(0, min(options.max_new_tokens, options.max_length - len(p))) for p in prompts]


@dataclass
class SharedPrefix:
    """The key/value cache of the first `length` tokens, which every prompt of an evaluation starts with (a shared
    demonstration set), computed once and copied for each prompt."""
    length: int
    cache: Any


@torch.inference_mode()
def shared_prefix(model, prompts: Sequence[Sequence[int]], min_length: int = 16) -> SharedPrefix | None:
    """The prefix of all prompts, less one token so that every prompt keeps a token of its own (the one whose
    logits start its generation); None when shorter than `min_length` (a BOS and a template's first words are not
    worth a cache copy per prompt)."""
    length = _common_prefix_len(prompts) if len(prompts) > 1 else 0
    length = min(length, min(len(p) for p in prompts) - 1)
    if length < min_length:
        return None
    out = model(input_ids=torch.tensor([list(prompts[0][:length])], device=model_device(model)), use_cache=True,
                logits_to_keep=1)
    return SharedPrefix(length, getattr(out, cache_keyword(model)))


@torch.inference_mode()
def generate_batch(model, tokenizer, tokens: TokenizerSettings, prompts: list[list[int]],
                   options: GenerationOptions, prefix: SharedPrefix | None = None, batch_size: int | None = None,
                   on_done: Callable[[int], None] | None = None) -> list[str]:
    """Continuations of the prompts, each stopped at a stop token or its budget, decoded without special tokens and
    stripped. At most `batch_size` prompts (default: all) are decoded together; `on_done(n)` is told as prompts
    finish (progress bars). Greedy decoding runs `greedy_tokens` (exact, fast; `prefix`: a cache of the prompts'
    common start from `shared_prefix`); sampling, beam search and models whose cache cannot be merged row by row
    (sliding-window layers) go through Hugging Face `generate` on left-padded batches."""
    stops = stop_token_ids(tokenizer, tokens, options.eos_token)
    budgets = _budgets(prompts, options)
    size = batch_size or max(len(prompts), 1)
    new_tokens = None
    # sharded weights: every forward is a collective, and the pool's forwards depend on when rows stop, which the
    # ranks must agree on step by step; generate's synced steps guarantee that
    if not options.sampling and options.num_beams == 1 and not parallel.is_sharded(model):
        try:
            new_tokens = greedy_tokens(model, prompts, stops, budgets, prefix, size, on_done)
        except CacheNotPoolable as error:
            logger.info("Greedy generation through `generate`: %s", error)
    if new_tokens is None:
        new_tokens = []
        for start in range(0, len(prompts), size):
            chunk = slice(start, start + size)
            new_tokens += _hf_generate(model, tokens, prompts[chunk], options, stops, budgets[chunk])
            if on_done is not None:
                on_done(len(prompts[chunk]))
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]


def _hf_generate(model, tokens: TokenizerSettings, prompts, options: GenerationOptions, stops, budgets):
    """`generate` on the left-padded batch, with the largest budget of the batch (a row past its own budget is cut
    afterwards, so every row keeps the reference's per-example limit)."""
    device = model_device(model)
    ids, mask = left_pad(prompts, tokens.pad_id, device)
    if max(budgets) == 0:
        return [[] for _ in prompts]
    kwargs: dict[str, Any] = dict(do_sample=options.sampling, num_beams=options.num_beams,
                                  max_new_tokens=max(budgets), eos_token_id=stops, pad_token_id=tokens.pad_id,
                                  num_return_sequences=1,
                                  # FSDP2 shards: every forward is a collective, so ranks that finish early keep
                                  # stepping until all have finished
                                  synced_gpus=parallel.is_sharded(model))
    if options.sampling:
        kwargs.update(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k)
    else:  # the model's own generation_config may carry sampling settings; greedy and beams stay deterministic
        kwargs.update(temperature=None, top_p=None, top_k=None)
    output = model.generate(input_ids=ids, attention_mask=mask, position_ids=None, **kwargs)
    rows = []
    for row, budget in zip(output[:, ids.shape[1]:].tolist(), budgets):
        row = row[:budget]
        ends = [i for i, t in enumerate(row) if t in stops]
        rows.append(row[:ends[0] + 1] if ends else row)
    return rows


class CacheNotPoolable(ValueError):
    """A key/value cache whose rows cannot be merged into a left-padded batch (e.g. sliding-window layers)."""


def _left_pad_columns(x: torch.Tensor, n: int) -> torch.Tensor:
    """n zero columns (positions) before a [batch, heads, positions, dim] tensor."""
    if n == 0:
        return x
    return torch.cat([x.new_zeros(x.shape[0], x.shape[1], n, x.shape[3]), x], dim=2)


@dataclass
class _Pool:
    """The rows being decoded together: their merged cache, its mask over cache columns (0: padding), each row's
    next position and last token, and which prompt each row belongs to."""
    cache: Any
    mask: torch.Tensor
    positions: torch.Tensor
    tokens: torch.Tensor
    rows: list[int]

    def add(self, other: "_Pool") -> None:
        """Append other's rows; the shorter side's cache is padded on the left so both end at the same column."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        grow, other_grow = width - self.mask.shape[1], width - other.mask.shape[1]
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad_columns(mine.keys, grow), _left_pad_columns(theirs.keys, other_grow)])
            mine.values = torch.cat([_left_pad_columns(mine.values, grow),
                                     _left_pad_columns(theirs.values, other_grow)])
        self.mask = torch.cat([torch.nn.functional.pad(self.mask, (grow, 0)),
                               torch.nn.functional.pad(other.mask, (other_grow, 0))])
        self.positions = torch.cat([self.positions, other.positions])
        self.tokens = torch.cat([self.tokens, other.tokens])
        self.rows += other.rows

    def keep(self, slots: list[int]) -> None:
        """Keep these rows; cache columns that are padding in every remaining row are cut off."""
        index = torch.tensor(slots, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.positions, self.tokens = self.mask[index], self.positions[index], self.tokens[index]
        self.rows = [self.rows[s] for s in slots]
        first = int(self.mask.any(0).int().argmax())
        if first > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]


def _poolable(cache) -> bool:
    from transformers.cache_utils import DynamicLayer
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


@torch.inference_mode()
def greedy_tokens(model, prompts: list[list[int]], stops: Sequence[int], budgets: Sequence[int],
                  prefix: SharedPrefix | None = None, batch_size: int | None = None,
                  on_done: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations (token ids, each ending with its stop token if it reached one) of every prompt, as
    per-example greedy decoding gives them: the first-argmax token of each step's logits until a stop token or the
    prompt's budget.

    Why not `generate` on padded batches: a padded prompt batch spends its prefill on padding, and the batch keeps
    computing every row until the last one stops. Here each prompt is prefilled on its own (no padding; a prompt's
    tokens already make the prefill matrix-matrix work; logits at the last position only; with a `prefix`, from a
    copy of the shared prefix's cache), which gives its first token. Rows still generating join a pool of at most
    `batch_size` rows whose caches are merged, left-padded, into one batch; each decoding step runs the whole pool
    (one token per row: where batching pays), rows that stop leave it with their cache rows, and waiting prompts take
    their places, so the pool stays full until the queue runs out. The one host synchronisation per step is the read
    of the new tokens, which deciding who stops needs anyway. Rows are independent (per-row masks and positions), so
    every token equals the per-example result up to floating-point round-off of batched kernels
    (tests/test_generation.py). Padded cache columns are zeros under a zero mask, so no pad token is needed.
    CacheNotPoolable: the model's cache cannot be merged row by row (the caller falls back to `generate`).
    """
    generated: list[list[int]] = [[] for _ in prompts]
    queue = deque(i for i, budget in enumerate(budgets) if budget > 0)
    limit = batch_size or max(len(queue), 1)
    device = model_device(model)
    cache_name = cache_keyword(model)
    stop_set = set(stops)

    def finished(row: int, token: int) -> bool:
        generated[row].append(token)
        done = token in stop_set or len(generated[row]) >= budgets[row]
        if done and on_done is not None:
            on_done(1)
        return done

    def prefill(row: int) -> _Pool:
        start, cache = (prefix.length, copy.deepcopy(prefix.cache)) if prefix is not None else (0, None)
        own = prompts[row][start:]
        out = model(input_ids=torch.tensor([own], device=device), use_cache=True, logits_to_keep=1,
                    position_ids=torch.arange(start, start + len(own), device=device)[None], **{cache_name: cache})
        cache = getattr(out, cache_name)
        if not _poolable(cache):
            raise CacheNotPoolable(f"{type(cache).__name__} with layers "
                                   f"{sorted({type(x).__name__ for x in getattr(cache, 'layers', [])})}")
        columns = cache.get_seq_length()  # prompt tokens, plus the prefix of a prefix-tuned model
        return _Pool(cache, torch.ones((1, columns), dtype=torch.long, device=device),
                     torch.tensor([start + len(own)], device=device), out.logits[:, -1].argmax(-1), [row])

    pool: _Pool | None = None
    while queue or pool is not None:
        while queue and (pool is None or len(pool.rows) < limit):
            joining = prefill(queue.popleft())
            if finished(joining.rows[0], int(joining.tokens[0])):
                continue
            if pool is None:
                pool = joining
            else:
                pool.add(joining)
        if pool is None:
            break
        pool.mask = torch.cat([pool.mask, pool.mask.new_ones((len(pool.rows), 1))], dim=1)
        # the mask covers every cache column (a prefix-tuned model's prefix too), so the prefix hook leaves it alone
        out = model(input_ids=pool.tokens[:, None], attention_mask=pool.mask, position_ids=pool.positions[:, None],
                    use_cache=True, **{cache_name: pool.cache})
        pool.cache = getattr(out, cache_name)
        pool.positions = pool.positions + 1
        pool.tokens = out.logits[:, -1].argmax(-1)
        keep = [slot for slot, (row, token) in enumerate(zip(pool.rows, pool.tokens.tolist()))
                if not finished(row, token)]
        if not keep:
            pool = None
        elif len(keep) < len(pool.rows):
            pool.keep(keep)
    if on_done is not None and len(prompts) > sum(1 for b in budgets if b > 0):
        on_done(sum(1 for b in budgets if b <= 0))  # prompts with no room left, never queued
    return generated


# --- the evaluator --------------------------------------------------------------------------------------------------

@dataclass
class EvalSettings:
    max_length: int = 2048
    sfc: bool = False
    icl_sfc: bool = False
    batch_size: int = 8
    verbose: bool = False
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    show_progress: bool = False   # progress bars for encoding, scoring and generation


def predict(model, tokenizer, tokens: TokenizerSettings, task, demo_sets: list[list], eval_samples: list,
            settings: EvalSettings) -> list[dict]:
    """One prediction record per eval sample; `demo_sets[i]` are the demonstrations of `eval_samples[i]`."""
    spec = task.spec
    template = spec.template()
    if spec.generation and (settings.sfc or settings.icl_sfc):
        raise ValueError(f"--sfc/--icl_sfc cannot be used with the generation task {spec.name}; drop the flag.")
    records = []
    pairs = progress(zip(demo_sets, eval_samples), total=len(eval_samples), desc=f"Encoding {spec.name}", unit="ex",
                     enabled=settings.show_progress)
    if spec.generation:
        prompts = [encode_prompt(template, spec.train_sep, demos, sample, tokenizer, tokens, settings.max_length,
                                 generation=True, max_new_tokens=settings.generation.max_new_tokens)
                   for demos, sample in pairs]
        warn_truncated(prompts, settings.max_length - settings.generation.max_new_tokens, "prompts")
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i].sequences[0]))
        greedy = not settings.generation.sampling and settings.generation.num_beams == 1
        # a demonstration set shared by every example runs once for the whole evaluation
        prefix = shared_prefix(model, [p.sequences[0] for p in prompts]) if greedy and prompts else None
        bar = progress(None, total=len(order), desc=f"Generating {spec.name}", unit="ex",
                       enabled=settings.show_progress)
        texts = generate_batch(model, tokenizer, tokens, [prompts[i].sequences[0] for i in order], settings.generation,
                               prefix, settings.batch_size, bar.update if settings.show_progress else None)
        if settings.show_progress:
            bar.close()
        outputs: list[str] = [""] * len(prompts)
        for i, text in zip(order, texts):
            outputs[i] = text
        for i, (sample, prompt, output) in enumerate(zip(eval_samples, prompts, outputs)):
            if settings.verbose or i < 3:
                logger.info("=== example %d ===\nPROMPT:\n%s\nGENERATED: %r  GOLD: %r", i, prompt.texts[0], output,
                            sample.correct_candidate)
            records.append({"id": sample.id, "correct_candidate": sample.correct_candidate,
                            "predicted_candidate": output})
        return records

    encoded = [encode_prompt(template, spec.train_sep, demos, sample, tokenizer, tokens, settings.max_length)
               for demos, sample in pairs]
    warn_truncated(encoded, settings.max_length, "prompts")
    groups = [(e.sequences, e.option_lens) for e in encoded]
    calibration = None
    if settings.sfc or settings.icl_sfc:
        calibration = [encode_prompt(template, spec.train_sep, demos, sample, tokenizer, tokens, settings.max_length,
                                     sfc=settings.sfc, icl_sfc=settings.icl_sfc)
                       for demos, sample in zip(demo_sets, eval_samples)]
        groups += [(e.sequences, e.option_lens) for e in calibration]
    option_log_probs = score_options(model, groups, tokens.pad_id, settings.batch_size, settings.show_progress)

    for i, sample in enumerate(eval_samples):
        per_option = option_log_probs[i]
        if calibration is not None:
            calibrated = option_log_probs[len(eval_samples) + i]
            scores = [(lp.sum() - cal.sum()).item() for lp, cal in zip(per_option, calibrated)]
        else:
            scores = [lp.mean().item() for lp in per_option]
        best = max(range(len(scores)), key=lambda j: (scores[j], -j))  # first argmax on ties
        if isinstance(sample.correct_candidate, list):
            gold = [sample.candidates.index(c) for c in sample.correct_candidate if c in sample.candidates]
        else:
            gold = sample.candidates.index(sample.correct_candidate)
        if settings.verbose or i < 3:
            logger.info("=== example %d ===\nPROMPT (candidate 0):\n%s\nCANDIDATES: %r\nSCORES: %s\nPREDICTED %d  GOLD %r",
                        i, encoded[i].texts[0], sample.candidates, [round(s, 4) for s in scores], best, gold)
        records.append({"id": sample.id, "correct_candidate": gold, "predicted_candidate": best,
                        "candidates": sample.candidates, "scores": scores})
    return records


def evaluate(model, tokenizer, tokens: TokenizerSettings, task, demo_sets: list[list], eval_samples: list,
             settings: EvalSettings) -> tuple[dict[str, float], list[dict]]:
    """The task metric and one record per example. With several processes each rank predicts its share of the
    examples and every rank gets all records back, in order."""
    if parallel.is_sharded(model):  # every forward is a collective: all ranks predict everything, in lockstep
        records = predict(model, tokenizer, tokens, task, demo_sets, eval_samples, settings)
    else:
        records = predict(model, tokenizer, tokens, task, parallel.shard(demo_sets), parallel.shard(eval_samples),
                          settings)
        records = parallel.gather(records, len(eval_samples))
    metric = task.spec.metric
    value = calculate_metric([Prediction(r["correct_candidate"], r["predicted_candidate"]) for r in records], metric)
    return {metric: value}, records
