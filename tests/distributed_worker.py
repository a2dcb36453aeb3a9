"""One process of a distributed test, launched by `torchrun` from tests/test_parallel.py (or alone, as the 1-process
reference): a tiny ZO run through trainer_zo.ZOTrainer on fixed records, then this rank's full parameters saved to
OUT/rank{RANK}.pt.

    torchrun --nproc_per_node 2 tests/distributed_worker.py MODEL_DIR OUT --batch 2 [--fsdp] [--optimizer zo_adamu]
"""

import argparse
import os
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import args as arguments  # noqa: E402
import models  # noqa: E402
from adapters import ADAPTERS  # noqa: E402
import parallel  # noqa: E402
import trainer_zo  # noqa: E402
from utils import ListDataset, Objective, TrainCollator  # noqa: E402


def records(n=16, seed=0):
    rng = random.Random(seed)
    return [{"input_ids": [rng.randrange(256) for _ in range(rng.randrange(6, 14))], "option_len": 3}
            for _ in range(n)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--optimizer", default="mezo")
    parser.add_argument("--mode", choices=("ft", "lora", "prefix", "head"), default="ft")
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--zo_parallel", choices=("data", "directions"), default="data")
    parser.add_argument("--directions", type=int, default=None)
    parser.add_argument("--exact_restore", choices=("auto", "always", "never"), default="auto")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    hf = arguments.HFArguments(output_dir=os.path.join(opts.out, "run"), per_device_train_batch_size=opts.batch,
                               gradient_accumulation_steps=opts.accumulation,
                               max_steps=opts.steps, learning_rate=1e-3, lr_scheduler_type="constant",
                               logging_steps=1, save_strategy="no", report_to="none", remove_unused_columns=False,
                               seed=0, use_cpu=True, max_grad_norm=0.0, disable_tqdm=True,
                               ddp_broadcast_buffers=False, dataloader_pin_memory=False)
    hf.device  # noqa: B018  (the Trainer's setup: under torchrun this initialises the gloo process group)
    rank, world = parallel.world()
    model = models.load_model(opts.model_dir, device=torch.device("cpu") if world > 1 else None,
                              fsdp_size=world if opts.fsdp else 1)
    if opts.mode != "ft":
        config = arguments.parse(["--trainer", "zo", "--num_train", "8", "--train_set_seed", "0",
                                  {"lora": "--lora", "prefix": "--prefix_tuning", "head": "--head_tuning"}[opts.mode]])
        model = ADAPTERS[opts.mode].apply(model, config)
    zo_args = arguments.ZOArguments(zo_optim=opts.optimizer, zo_eps=1e-3, zo_parallel=opts.zo_parallel,
                                    zo_num_directions=opts.directions, zo_exact_restore=opts.exact_restore)
    trainer = trainer_zo.ZOTrainer(model=model, args=hf, train_dataset=ListDataset(records()),
                                   data_collator=TrainCollator(0), objective=Objective(), zo_args=zo_args,
                                   task_eval=trainer_zo.TaskEval(None, [], None, None, None))
    trainer.train()
    full = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in model.named_parameters()}
    logged = [e for e in trainer.state.log_history if "projected_grad" in e]
    trained = {name: full[name] for name, p in model.named_parameters() if p.requires_grad}
    torch.save({"params": trained, "projected_grads": [e["projected_grad"] for e in logged],
                "losses": [(e["loss"], e["loss_minus"]) for e in logged], "world": world},
               os.path.join(opts.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
