"""Does it learn? Fine-tune the embedded model on real task data and report the dev curve and the test metric.

    python bench/learn.py --task SST2 --mode ft --method adam --steps 50 --lr 1e-5
    python bench/learn.py --task SST2 --mode lora --method mezo --steps 1000 --lr 1e-3 --eps 1e-2
    python bench/learn.py --task SST2 --mode prefix --method zo_adamu --steps 1000 --lr 3e-2 --eps 1e-1
    python bench/learn.py --task RTE --mode lora --method hizoo --forwards 400   # steps = 400 // 3 forwards a step

--method is adam or any --zo_optim (zo_methods.OPTIMIZERS).  Without --lr/--eps: for MeZO and ZO-AdaMU the settings
the SST2 grids of docs/results.md chose (or, where a grid's pick diverged, its stable point) and MeZO's ε for the
mode (full 1e-3, LoRA 1e-2, prefix 1e-1); for the other ZO methods their registry defaults for the mode
(zo_methods.mode_defaults).
--forwards F sets the steps to F // (the method's forward passes a step): the way to compare methods at one budget.

Data: 1,000 train and 500 dev examples drawn as run.py does (train_set_seed), test examples from the validation split.
The objective is the one the scripts use for the task (SST2: cross-entropy over the candidates). The last line is one
JSON object: task, mode, method, zero_shot, final (test metric after the last step; null for --stop_at grid runs,
which never look at the test set), curve ([step, dev metric] pairs from step 0), forward_passes (training forwards:
one per Adam step, the method's `forwards` per ZO step, times the accumulation steps, counted from step 0 also for a
resumed run), seconds (training wall time of this process), peak_rss_mb (the process's peak resident memory: model,
data, optimizer state and evaluation together) and optimizer_elements (what the optimizer holds beside the model,
by name, in elements).
"""

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import args as arguments  # noqa: E402
import evaluator  # noqa: E402
import models  # noqa: E402
import run  # noqa: E402
import tasks  # noqa: E402
from zo import registry as zo_methods  # noqa: E402

# The LR each SST2 grid of docs/results.md chose (ZO-AdaMU LoRA: its stable 1e-3, since the chosen 3e-3 diverged later);
# Adam's are the single runs of the first-order table there. ε is MeZO's for the mode.
DEFAULT_LR = {"adam": {"ft": 1e-5, "lora": 1e-4, "prefix": 1e-2},
              "mezo": {"ft": 3e-5, "lora": 1e-3, "prefix": 3e-2},
              "zo_adamu": {"ft": 3e-5, "lora": 1e-3, "prefix": 3e-2}}
DEFAULT_EPS = {"ft": 1e-3, "lora": 1e-2, "prefix": 1e-1}


class StopAt(TrainerCallback):
    """Ends training after `step` steps, with a dev evaluation there, leaving the LR/ZO-AdaMU schedule untouched."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
            control.should_evaluate = True
        return control


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="SST2")
    parser.add_argument("--mode", choices=["ft", "lora", "prefix"], default="ft")
    parser.add_argument("--method", choices=["adam", *zo_methods.OPTIMIZERS], default="adam")
    parser.add_argument("--model", default=models.EMBEDDED_ALIAS)
    parser.add_argument("--steps", type=int, default=None, help="default: 50 for adam, 1000 for ZO")
    parser.add_argument("--forwards", type=int, default=None,
                        help="training forward passes: steps = this // the method's forwards a step (not with --steps)")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--eps", type=float, default=None, help="ZO perturbation scale (default: MeZO's for the mode)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval_every", type=int, default=None, help="dev evaluation interval (default steps/10)")
    parser.add_argument("--stop_at", type=int, default=None,
                        help="grid search: stop after this many of --steps (the schedule still spans --steps) and "
                             "report the dev curve only, never the test set")
    parser.add_argument("--output_dir", default=None, help="checkpoints go here (default: a temporary folder)")
    parser.add_argument("--save_every", type=int, default=None, help="checkpoint interval (default: no checkpoints)")
    parser.add_argument("--resume_from", default=None,
                        help="a checkpoint of the same run (e.g. the best grid run's) to continue from")
    parser.add_argument("--num_train", type=int, default=1000)
    parser.add_argument("--num_dev", type=int, default=500)
    parser.add_argument("--num_eval", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="train set seed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more run.py flags")
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    per_step = 1 if opts.method == "adam" else zo_methods.forward_passes(opts.method)
    if opts.forwards is not None and (opts.steps is not None or opts.forwards < per_step):
        parser.error(f"--forwards {opts.forwards}: give it without --steps, and at least {per_step} (the forward "
                     f"passes of one {opts.method} step)")
    steps = opts.forwards // per_step if opts.forwards else opts.steps or (50 if opts.method == "adam" else 1000)
    if opts.stop_at is not None and not 1 <= opts.stop_at <= steps:
        parser.error(f"--stop_at {opts.stop_at} must lie between 1 and --steps ({steps})")
    if opts.save_every is not None and opts.save_every < 1:
        parser.error(f"--save_every {opts.save_every} must be at least 1 (leave it out for no checkpoints)")
    if opts.resume_from is not None and not (Path(opts.resume_from) / "trainer_state.json").is_file():
        parser.error(f"--resume_from {opts.resume_from} is not a checkpoint folder (no trainer_state.json); pass a "
                     "checkpoint-N folder written with --save_every")
    defaults = (DEFAULT_LR[opts.method][opts.mode], DEFAULT_EPS[opts.mode]) if opts.method in DEFAULT_LR else \
        zo_methods.mode_defaults(opts.method, opts.mode)
    lr = opts.lr if opts.lr is not None else defaults[0]
    eps = opts.eps if opts.eps is not None else defaults[1]
    data_dir = opts.data_dir or next((str(p) for p in [ROOT.parent / "shared" / "data"] if p.is_dir()), None)
    spec = tasks.get_task_spec(opts.task)

    flags = ["--task_name", opts.task, "--model_name", opts.model, "--num_train", str(opts.num_train),
             "--num_dev", str(opts.num_dev), "--num_eval", str(opts.num_eval), "--train_set_seed", str(opts.seed),
             "--max_steps", str(steps), "--learning_rate", str(lr), "--per_device_train_batch_size", str(opts.batch),
             "--eval_strategy", "steps", "--eval_steps", str(opts.eval_every or max(steps // 10, 1)),
             "--logging_steps", "10", "--report_to", "none",
             "--output_dir", opts.output_dir or tempfile.mkdtemp(prefix="learn-")]
    flags += ["--save_strategy", "steps", "--save_steps", str(opts.save_every)] if opts.save_every else \
        ["--save_strategy", "no"]
    if opts.data_dir or data_dir:
        flags += ["--data_dir", data_dir]
    if opts.method == "adam":
        flags += ["--trainer", "regular", "--lr_scheduler_type", "constant"]
    else:
        flags += ["--trainer", "zo", "--zo_optim", opts.method, "--zo_eps", str(eps),
                  "--lr_scheduler_type", "constant"]
    flags += {"ft": [], "lora": ["--lora"], "prefix": ["--prefix_tuning"]}[opts.mode] + opts.extra
    try:
        config = arguments.parse(flags)
    except arguments.UsageError as error:
        parser.error("; ".join(error.problems))
    torch.manual_seed(config.hf.seed)

    task = tasks.load_task(opts.task, data_dir)
    _, train_sets = task.sample_train_sets(opts.num_train, opts.num_dev, opts.num_eval, None, opts.seed)
    train_samples, dev_samples = run.split_dev(config, train_sets[0])
    test_samples = task.sample_subset("validation", opts.seed, opts.num_eval)
    tokenizer = models.load_tokenizer(opts.model)
    model = run.load_model(config)
    tokens = models.tokenizer_settings(tokenizer, model.config)
    settings = evaluator.EvalSettings(max_length=config.model.max_length, batch_size=16)
    metric = spec.metric

    grid_run = opts.stop_at is not None and opts.stop_at < steps

    def test_metric(model):
        if grid_run:
            return None
        scores, _ = evaluator.evaluate(model, tokenizer, tokens, task, [[]] * len(test_samples), test_samples,
                                       settings)
        return scores[metric]

    zero_shot = test_metric(model)
    if zero_shot is not None:
        print(f"zero-shot test {metric}: {zero_shot:.4f}", flush=True)
    trainer = run.build_trainer(config, task, model, tokenizer, tokens, train_samples, dev_samples, settings,
                                Path(config.hf.output_dir))
    if grid_run:
        trainer.add_callback(StopAt(opts.stop_at))
    # the curve's step-0 point: the freshly built model (a resumed run starts from that same model and seed)
    dev_at_start = trainer.evaluate()[f"eval_{metric}"]
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=opts.resume_from)
    seconds = time.perf_counter() - start
    curve = [[0, dev_at_start]] + [[entry["step"], entry[f"eval_{metric}"]] for entry in trainer.state.log_history
                                   if f"eval_{metric}" in entry]
    final = test_metric(trainer.model)
    optimizer = getattr(trainer, "_zo_optimizer", None)
    # the trainer probes --zo_num_directions directions a step (from --extra), which the optimizer alone does not know
    forwards = zo_methods.forward_passes(opts.method, config.zo.zo_num_directions) if optimizer is not None else 1
    per_step = forwards * config.hf.gradient_accumulation_steps
    held = optimizer.memory_buffers() if optimizer is not None else {
        name: sum(v.numel() for s in getattr(trainer.optimizer, "optimizer", trainer.optimizer).state.values()
                  for k, v in s.items()
                  if k == name and torch.is_tensor(v)) for name in ("exp_avg", "exp_avg_sq")}
    print(json.dumps({"task": opts.task, "mode": opts.mode, "method": opts.method, "lr": lr,
                      "eps": None if opts.method == "adam" else eps, "steps": steps, "batch": opts.batch,
                      "zero_shot": zero_shot, "final": final, "curve": curve, "stopped_at": opts.stop_at,
                      "forward_passes": per_step * trainer.state.global_step, "seconds": round(seconds, 1),
                      "resumed_from": opts.resume_from,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "optimizer_elements": held,
                      "sizes": [len(train_samples), len(dev_samples), len(test_samples)],
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                      else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"}))


if __name__ == "__main__":
    main()
