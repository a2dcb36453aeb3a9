"""run.py with streamed weights (--zo_offload cpu) through HF's Trainer against the resident run, and a streamed resume.

On a GPU this is what the CPU tests cannot show: that the Trainer and accelerate leave the streamed blocks where
zo.offload put them (host memory, uploaded block by block) and that a checkpoint of a streamed run resumes. Three runs
of run.py in fresh processes on a random-weight OPT shape saved with the given tokenizer, ZO-AdaMU with one-pass
probes, 4 steps, checkpoints every 2:
    resident   --zo_offload none
    streamed   --zo_offload cpu
    resumed    --zo_offload cpu in a copy of the streamed run's folder without its checkpoint-4 (run.py resumes
               from checkpoint-2)
Reported: whether each ran, streamed == resident and resumed == streamed (test predictions and accuracy: the same
bits on the CPU stand-in; on CUDA the sweeps are the same element-wise kernels, so also expected equal), the device,
and what streamed (the result's training.offload). Last line: one JSON object.

    python bench/offload_trainer.py --tokenizer /path/to/tokenizer --data_dir ../shared/data
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from offload import SHAPES, config_of  # noqa: E402


def save_model(folder: Path, tokenizer_dir: str, shape: str) -> None:
    import torch
    from transformers import AutoTokenizer, OPTForCausalLM
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = config_of(shape)   # bench/offload.py's shape, with this tokenizer's vocabulary and special ids
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run(work: Path, name: str, model: Path, offload: str, timeout: int) -> dict | None:
    argv = [sys.executable, str(ROOT / "run.py"), "--model_name", str(model), "--task_name", "SST2", "--trainer", "zo",
            "--zo_optim", "zo_adamu", "--learning_rate", "1e-3", "--zo_probe", "onepass", "--zo_offload", offload,
            "--train_set_seed", "0", "--num_train", "32", "--num_dev", "8", "--num_eval", "16", "--max_steps", "4",
            "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
            "--per_device_train_batch_size", "4", "--train_as_classification", "--disable_tqdm", "true",
            "--report_to", "none", "--output_dir", str(work / name), "--result_file", str(work / f"{name}.json")]
    with open(work / f"{name}.log", "w") as log:
        try:
            subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT, check=False)
        except subprocess.TimeoutExpired:
            log.write(f"\nbench/offload_trainer.py: stopped after {timeout} s\n")
    result = work / f"{name}.json"
    return json.loads(result.read_text()) if result.is_file() else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder (the embedded model's)")
    parser.add_argument("--shape", default="opt-125m", choices=sorted(SHAPES))
    parser.add_argument("--data_dir", default=None, help="task data (default: ZO_DATA_DIR)")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per run")
    parser.add_argument("--keep", default=None, help="copy the runs' logs here")
    args = parser.parse_args()
    if not Path(args.tokenizer).is_dir():
        parser.error(f"--tokenizer {args.tokenizer}: no such folder")
    if args.data_dir:
        os.environ["ZO_DATA_DIR"] = args.data_dir
    with tempfile.TemporaryDirectory(prefix="offload-trainer-") as tmp:
        work, model = Path(tmp), Path(tmp) / "model"
        save_model(model, args.tokenizer, args.shape)
        runs = {"resident": run(work, "resident", model, "none", args.timeout),
                "streamed": run(work, "streamed", model, "cpu", args.timeout)}
        if (work / "streamed" / "checkpoint-2").is_dir():   # the run's folder as it was after step 2
            shutil.copytree(work / "streamed", work / "resumed",
                            ignore=lambda folder, names: [n for n in names if n.startswith("checkpoint-")
                                                          and n != "checkpoint-2" and Path(folder).name == "streamed"])
        runs["resumed"] = run(work, "resumed", model, "cpu", args.timeout)
        log = (work / "resumed.log").read_text()
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for name in runs:
                shutil.copy(work / f"{name}.log", Path(args.keep) / f"offload-trainer-{name}.log")

    def same(a, b):
        return bool(a and b) and a["predictions"] == b["predictions"] and a["accuracy"] == b["accuracy"]
    streamed = runs["streamed"] or {}
    report = {"shape": args.shape, "ran": {k: v is not None for k, v in runs.items()},
              "streamed_equals_resident": same(runs["resident"], runs["streamed"]),
              "resumed_equals_streamed": same(runs["streamed"], runs["resumed"]),
              "resumed_from_checkpoint": "Resuming from" in log and "checkpoint-2" in log,
              "device": streamed.get("provenance", {}).get("device"),
              "offload": streamed.get("training", {}).get("offload")}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
