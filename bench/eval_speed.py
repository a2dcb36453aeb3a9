"""Evaluator speed: our batched, prefix-reusing scorer against a naive reference-style scorer.

The naive scorer does what MeZO's evaluator does: one forward pass per candidate, batch 1, full-vocabulary logits at
every position, nothing reused. Both score the same encoded prompts of the same examples.

    python bench/eval_speed.py                       # embedded model, SST2, 16 demos, 64 examples, both demo modes
    python bench/eval_speed.py --demos per_example   # one demo set per eval example (icl.sh's mode) only

Last line: one JSON object with "speedup" (naive time / ours) and "agreement" (fraction of identical predictions).
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
    parser.add_argument("--num_demos", type=int, default=16)
    parser.add_argument("--num_eval", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--demos", choices=["both", "per_example", "shared"], default="both",
                        help="per_example: one demo set per eval example (icl.sh); shared: one set for all")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data_dir", default=os.environ.get(tasks.DATA_DIR_ENV) or
                        (str(ROOT.parent / "shared" / "data") if (ROOT.parent / "shared" / "data").is_dir() else None))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    task = tasks.load_task(args.task, args.data_dir)
    tokenizer = models.load_tokenizer(args.model)
    model = models.load_model(args.model)
    tokens = models.tokenizer_settings(tokenizer, model.config)
    samples = task.sample_subset("validation", 0, args.num_eval)
    modes = ["per_example", "shared"] if args.demos == "both" else [args.demos]
    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "model": args.model, "task": args.task, "num_demos": args.num_demos, "num_eval": len(samples)}
    for mode in modes:
        if mode == "shared":
            _, sets = task.sample_train_sets(args.num_demos, None, None, None, seed=0)
            demo_sets = sets * len(samples)
        else:
            _, demo_sets = task.sample_train_sets(args.num_demos, None, len(samples), None, None)
        report[mode] = measure(model, tokenizer, tokens, task, demo_sets, samples, args.batch_size, args.max_length)
        print(f"{mode}: {report[mode]}", flush=True)
    headline = report[modes[0]]
    report["speedup"], report["agreement"] = headline["speedup"], min(report[m]["agreement"] for m in modes)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
