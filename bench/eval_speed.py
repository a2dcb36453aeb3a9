"""Evaluator speed: our batched scorer and greedy generator against naive reference-style ones.

Classification tasks: the naive scorer does what MeZO's evaluator does: one forward pass per candidate, batch 1,
full-vocabulary logits at every position, nothing reused. Both score the same encoded prompts of the same examples.
Generation tasks (SQuAD, DROP): the naive generator does what MeZO's does: one example at a time, Hugging Face
`generate`, greedy, stopping at the newline or EOS, on the same encoded prompts; `hf_batched_s` times `generate` on
the same left-padded, length-sorted batches as ours (this suite's previous generator), for comparison.

    python bench/eval_speed.py                       # embedded model, SST2, 16 demos, 64 examples, both demo modes
    python bench/eval_speed.py --demos per_example   # one demo set per eval example (icl.sh's mode) only
    python bench/eval_speed.py --task SQuAD          # greedy generation, zero-shot (as evaluated after training)
    python bench/eval_speed.py --task SQuAD --num_demos 2 --demos shared

Last line: one JSON object with "speedup" (naive wall time / ours) and "agreement" (fraction of identical predictions
or generations; anything below 1.0 is a bug), the machine's load average before and after, and the thread count.
Generation also reports CPU seconds of the process and their ratio ("speedup_cpu"), which other processes on a shared
machine disturb far less than wall time.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import evaluator  # noqa: E402
import models  # noqa: E402
import tasks  # noqa: E402
from metrics import Prediction, calculate_metric  # noqa: E402


@torch.inference_mode()
def naive_predictions(model, tokenizer, tokens, task, demo_sets, samples, max_length):
    template = task.spec.template()
    predictions = []
    for demos, sample in zip(demo_sets, samples):
        encoded = evaluator.encode_prompt(template, task.spec.train_sep, demos, sample, tokenizer, tokens, max_length)
        scores = []
        for sequence, option_len in zip(encoded.sequences, encoded.option_lens):
            logits = model(input_ids=torch.tensor([sequence])).logits[0]
            log_probs = logits[:-1].float().log_softmax(-1).gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]
            scores.append(log_probs[-option_len:].mean().item())
        predictions.append(max(range(len(scores)), key=lambda j: (scores[j], -j)))
    return predictions


@torch.inference_mode()
def naive_generations(model, tokenizer, tokens, task, demo_sets, samples, options):
    """MeZO's generator: encode, then `generate` one example at a time, greedy, stop at the newline or EOS."""
    template = task.spec.template()
    stops = evaluator.stop_token_ids(tokenizer, tokens, options.eos_token)
    texts = []
    for demos, sample in zip(demo_sets, samples):
        ids = evaluator.encode_prompt(template, task.spec.train_sep, demos, sample, tokenizer, tokens,
                                      options.max_length, generation=True,
                                      max_new_tokens=options.max_new_tokens).sequences[0]
        device = models.model_device(model)
        output = model.generate(input_ids=torch.tensor([ids], device=device),
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                                max_new_tokens=min(options.max_new_tokens, options.max_length - len(ids)),
                                eos_token_id=stops, pad_token_id=tokens.pad_id, num_return_sequences=1)
        texts.append(tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip())
    return texts


@torch.inference_mode()
def hf_batched_generations(model, tokenizer, tokens, task, demo_sets, samples, options, batch_size):
    """`generate` on left-padded batches in the evaluator's order (longest prompts first)."""
    template = task.spec.template()
    stops = evaluator.stop_token_ids(tokenizer, tokens, options.eos_token)
    prompts = [evaluator.encode_prompt(template, task.spec.train_sep, demos, sample, tokenizer, tokens,
                                       options.max_length, generation=True,
                                       max_new_tokens=options.max_new_tokens).sequences[0]
               for demos, sample in zip(demo_sets, samples)]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        batch_prompts = [prompts[i] for i in batch]
        rows = evaluator._hf_generate(model, tokens, batch_prompts, options, stops,
                                      evaluator._budgets(batch_prompts, options))
        for i, row in zip(batch, rows):
            texts[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
    return texts


@torch.inference_mode()
def prefill_only(model, tokenizer, tokens, task, demo_sets, samples, options):
    """Each prompt's forward pass alone, as the first step of per-example generation does it: the part of the naive
    generator's time that batching cannot shrink (a prompt's prefill is matrix-matrix work already)."""
    template = task.spec.template()
    device = models.model_device(model)
    for demos, sample in zip(demo_sets, samples):
        ids = evaluator.encode_prompt(template, task.spec.train_sep, demos, sample, tokenizer, tokens,
                                      options.max_length, generation=True,
                                      max_new_tokens=options.max_new_tokens).sequences[0]
        model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)


def measure_generation(model, tokenizer, tokens, task, demo_sets, samples, batch_size, max_length, max_new_tokens):
    options = evaluator.GenerationOptions(max_new_tokens=max_new_tokens, max_length=max_length)
    settings = evaluator.EvalSettings(max_length=max_length, batch_size=batch_size, generation=options)
    evaluator.predict(model, tokenizer, tokens, task, demo_sets[:2], samples[:2], settings)  # warm-up
    timings, outputs = {}, {}
    runs = {"ours": lambda: [r["predicted_candidate"] for r in evaluator.predict(model, tokenizer, tokens, task,
                                                                                  demo_sets, samples, settings)],
            "naive": lambda: naive_generations(model, tokenizer, tokens, task, demo_sets, samples, options),
            "hf_batched": lambda: hf_batched_generations(model, tokenizer, tokens, task, demo_sets, samples, options,
                                                         batch_size),
            "prefill": lambda: prefill_only(model, tokenizer, tokens, task, demo_sets, samples, options)}
    cpu = {}
    for name, run in runs.items():
        start, start_cpu = time.perf_counter(), time.process_time()
        outputs[name] = run()
        timings[name], cpu[name] = time.perf_counter() - start, time.process_time() - start_cpu
    ours, naive = outputs["ours"], outputs["naive"]
    differing = [i for i, (a, b) in enumerate(zip(ours, naive)) if a != b]
    golds = [s.correct_candidate for s in samples]
    metric = task.spec.metric
    result = {"ours_s": round(timings["ours"], 2), "naive_s": round(timings["naive"], 2),
              "hf_batched_s": round(timings["hf_batched"], 2),
              "speedup": round(timings["naive"] / timings["ours"], 2),
              "speedup_vs_hf_batched": round(timings["hf_batched"] / timings["ours"], 2),
              # CPU seconds of this process: what the other tenants of a shared machine do not change (as much)
              "ours_cpu_s": round(cpu["ours"], 2), "naive_cpu_s": round(cpu["naive"], 2),
              "hf_batched_cpu_s": round(cpu["hf_batched"], 2), "speedup_cpu": round(cpu["naive"] / cpu["ours"], 2),
              # per-example prefill alone: the naive time over it bounds any speed-up that batching can bring
              "prefill_cpu_s": round(cpu["prefill"], 2), "bound_cpu": round(cpu["naive"] / cpu["prefill"], 2),
              "agreement": 1 - len(differing) / len(samples),
              "agreement_hf_batched": sum(a == b for a, b in zip(outputs["hf_batched"], naive)) / len(samples),
              f"{metric}_ours": round(calculate_metric([Prediction(g, p) for g, p in zip(golds, ours)], metric), 4),
              f"{metric}_naive": round(calculate_metric([Prediction(g, p) for g, p in zip(golds, naive)], metric), 4),
              "mean_new_words": round(sum(len(t.split()) for t in naive) / len(naive), 1)}
    if differing:
        result["differing"] = [{"example": i, "ours": ours[i], "naive": naive[i]} for i in differing[:5]]
    return result


def measure(model, tokenizer, tokens, task, demo_sets, samples, batch_size, max_length):
    settings = evaluator.EvalSettings(max_length=max_length, batch_size=batch_size)
    evaluator.predict(model, tokenizer, tokens, task, demo_sets[:2], samples[:2], settings)  # warm-up
    start = time.perf_counter()
    ours = [r["predicted_candidate"] for r in evaluator.predict(model, tokenizer, tokens, task, demo_sets, samples,
                                                                 settings)]
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    naive = naive_predictions(model, tokenizer, tokens, task, demo_sets, samples, max_length)
    naive_seconds = time.perf_counter() - start
    agreement = sum(a == b for a, b in zip(ours, naive)) / len(samples)
    return {"ours_s": round(ours_seconds, 2), "naive_s": round(naive_seconds, 2),
            "speedup": round(naive_seconds / ours_seconds, 2), "agreement": agreement}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=models.EMBEDDED_ALIAS)
    parser.add_argument("--task", default="SST2")
    parser.add_argument("--num_demos", type=int, default=None,
                        help="demonstrations per prompt (default: 16 for classification, 0 for generation tasks, "
                             "which are evaluated zero-shot after fine-tuning)")
    parser.add_argument("--num_eval", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--max_new_tokens", type=int, default=50, help="generation budget (run.py's default)")
    parser.add_argument("--demos", choices=["both", "per_example", "shared"], default="both",
                        help="per_example: one demo set per eval example (icl.sh); shared: one set for all")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data_dir", default=os.environ.get(tasks.DATA_DIR_ENV) or
                        (str(ROOT.parent / "shared" / "data") if (ROOT.parent / "shared" / "data").is_dir() else None))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    task = tasks.load_task(args.task, args.data_dir)
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_model(args.model)
    tokens = models.tokenizer_settings(tokenizer, model.config)
    samples = task.sample_subset("validation", 0, args.num_eval)
    generation = task.spec.generation
    if args.num_demos is None:
        args.num_demos = 0 if generation else 16
    modes = ["per_example", "shared"] if args.demos == "both" else [args.demos]
    if args.num_demos == 0:
        modes = ["zero_shot"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"
    report = {"device": device, "model": args.model, "task": args.task, "num_demos": args.num_demos,
              "num_eval": len(samples)}
    for mode in modes:
        if mode == "zero_shot":
            demo_sets = [[] for _ in samples]
        elif mode == "shared":
            _, sets = task.sample_train_sets(args.num_demos, None, None, None, seed=0)
            demo_sets = sets * len(samples)
        else:
            _, demo_sets = task.sample_train_sets(args.num_demos, None, len(samples), None, None)
        if generation:
            report[mode] = measure_generation(model, tokenizer, tokens, task, demo_sets, samples, args.batch_size,
                                              args.max_length, args.max_new_tokens)
        else:
            report[mode] = measure(model, tokenizer, tokens, task, demo_sets, samples, args.batch_size,
                                   args.max_length)
        print(f"{mode}: {report[mode]}", flush=True)
    headline = report[modes[0]]
    report["speedup"], report["agreement"] = headline["speedup"], min(report[m]["agreement"] for m in modes)
    report["batch_size"] = args.batch_size
    report["load_average"] = [round(x, 2) for x in load_before + os.getloadavg()]  # 1/5/15 min, before and after
    print(json.dumps(report))


if __name__ == "__main__":
    main()
