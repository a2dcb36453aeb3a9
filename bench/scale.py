"""Examples per second of ZO training on 1, 2, ... processes, data-parallel and with FSDP2-sharded weights.

    python bench/scale.py                                  # the embedded model, 1 and 2 CPU processes, both modes
    python bench/scale.py --procs 1,2,4,8 --model facebook/opt-1.3b --batch 16 --seq 256     # a GPU machine

Each measurement is a `torchrun` launch of this file in worker mode: every process loads the model (whole, or its
FSDP2 shards), builds a batch of --batch real SST2 rows of exactly --seq tokens, and runs --steps MeZO steps after one
warm-up step, combining its probe losses with the other ranks' as the trainer does (parallel.mean_over_ranks; FSDP2:
parallel.reshard after each forward). The per-process batch is fixed, so P processes train on P x --batch examples a
step (weak scaling). efficiency = (examples/s on P processes) / (P x examples/s on one). Last line: one JSON object
{"device", "procs", "examples_per_s", "efficiency", ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    return f"cpu ({os.cpu_count()} cores)"


def launch(opts, procs: int, mode: str) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(Path(__file__).resolve()), "--worker", mode,
               "--model", opts.model, "--batch", str(opts.batch), "--seq", str(opts.seq), "--steps", str(opts.steps),
               "--threads", str(opts.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{mode} on {procs} processes failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(opts) -> None:
    import models
    import parallel
    import tasks
    import utils
    import zo
    from zo import registry as zo_methods
    from args import HFArguments
    torch.set_num_threads(opts.threads)
    hf = HFArguments(output_dir="/tmp/scale", use_cpu=not torch.cuda.is_available(), report_to="none")
    hf.device  # noqa: B018  (the Trainer's setup: initialises the process group under torchrun)
    rank, world = parallel.world()
    sharded = opts.worker == "fsdp" and world > 1
    model = models.load_model(opts.model, device=hf.device if world > 1 else None, fsdp_size=world if sharded else 1)
    tokenizer = models.load_tokenizer(opts.model)
    tokens = models.tokenizer_settings(tokenizer, model.config)
    data_dir = os.environ.get(tasks.DATA_DIR_ENV) or (str(ROOT.parent / "shared" / "data")
                                                      if (ROOT.parent / "shared" / "data").is_dir() else None)
    task = tasks.load_task("SST2", data_dir)
    samples = task.sample_subset("train", rank, 64 * opts.batch)  # each rank its own rows, as a sampler gives
    records = utils.build_train_records(task, samples, tokenizer, tokens, utils.Objective(), max_length=opts.seq)
    rows, pending = [], iter(records)
    for _ in range(opts.batch):  # rows of exactly --seq real tokens: earlier examples as left context
        last = next(pending)
        ids = list(last["input_ids"])
        while len(ids) < opts.seq:
            ids = list(next(pending)["input_ids"]) + ids
        rows.append({"input_ids": ids[-opts.seq:], "option_len": min(last["option_len"], opts.seq - 1)})
    batch = {k: v.to(hf.device) if torch.is_tensor(v) else v
             for k, v in utils.TrainCollator(tokens.pad_id, pad_to_multiple_of=1)(rows).items()}
    objective = utils.Objective()
    optimizer = zo_methods.get("mezo")(zo.param_groups_for_model(model, 0.0), lr=1e-7, eps=1e-3)

    def closure():
        loss = utils.training_loss(model, batch, objective)
        parallel.reshard(model)
        return parallel.mean_over_ranks(loss, utils.loss_weight(batch, objective))

    optimizer.step(closure)  # warm-up: kernels built, allocator and caches filled
    times = []
    for _ in range(opts.steps):
        parallel.barrier()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step(closure)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        parallel.barrier()
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    if rank == 0:
        print(json.dumps({"procs": world, "mode": opts.worker, "step_seconds": round(step, 4),
                          "examples_per_s": round(world * opts.batch / step, 3)}), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts")
    parser.add_argument("--modes", default="dp,fsdp", help="dp (every process holds the model), fsdp (shards)")
    parser.add_argument("--batch", type=int, default=8, help="examples per process and step")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        return worker(opts)
    try:
        procs = [int(p) for p in opts.procs.split(",")]
    except ValueError:
        parser.error(f"--procs {opts.procs!r}: give comma-separated process counts, e.g. 1,2,4")
    if not procs or min(procs) < 1:
        parser.error(f"--procs {opts.procs!r}: process counts must be >= 1")
    modes = opts.modes.split(",")
    if set(modes) - {"dp", "fsdp"}:
        parser.error(f"--modes {opts.modes!r}: choose from dp, fsdp")
    report = {"device": device_name(), "model": opts.model, "batch_per_process": opts.batch, "seq": opts.seq,
              "threads_per_process": opts.threads, "load_average": os.getloadavg()[0], "modes": {}}
    single = launch(opts, 1, "dp")  # one process holds the whole model in either mode: the baseline of both
    for mode in modes:
        runs = [dict(single, mode=mode) if p == 1 else launch(opts, p, mode) for p in procs]
        for r in runs:
            r["efficiency"] = round(r["examples_per_s"] / (r["procs"] * single["examples_per_s"]), 3)
        report["modes"][mode] = {"runs": runs}
        print(f"{mode}: " + ", ".join(f"{r['procs']} procs {r['examples_per_s']} ex/s (eff. {r['efficiency']})"
                                      for r in runs), file=sys.stderr, flush=True)
    first = report["modes"][modes[0]]["runs"]
    report.update(procs=[r["procs"] for r in first], examples_per_s=[r["examples_per_s"] for r in first],
                  efficiency=[r["efficiency"] for r in first])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
