"""Hugging Face `Trainer` glue: task-metric evaluation, stopping on a signal, and the zeroth-order training step.

`SuiteTrainer` computes the suite's losses (utils.training_loss), evaluates the dev set by the task metric, and on
SIGTERM, SIGINT or SIGUSR1 finishes the step, saves a complete checkpoint and stops (`interrupted` says which signal).
`ZOTrainer` replaces the backward pass by seeded probes of a `zo.ZOOptimizer` (of each of the step's directions;
with --zo_parallel directions, of this rank's share of them on the whole batch, the rest exchanged before the update)
and lets the optimizer update at the accumulation boundary. Probes perturb the weights in place, or inside the
modules' forwards (--zo_probe forward / onepass: the optimizer is attached to the model when it is created).
The public hooks `compute_loss`, `training_step`, `create_optimizer`, `evaluate`, `save_model`, `log`, `train` and
`get_train_dataloader` are overridden, so the HF training loop, schedulers, logging, checkpointing and resume are
untouched. Three private methods are extended (each calls the original for everything it does not handle):
* `_load_from_checkpoint` and `_load_best_model`: checkpoints of prefix-tuned runs hold the prefix only, and HF's two
  loaders know only full weights and peft's `PeftModel` adapters (which is how LoRA checkpoints are saved and loaded,
  by HF itself); there is no public hook for either load (adapters.py says who loads what).
* `_load_best_model` also loads the best weights of an --fsdp run into the sharded model (HF's loader expects whole
  parameters).
* `_issue_warnings_after_load`: HF warns that a tied output head (`lm_head.weight`) is missing from a checkpoint,
  because transformers 5 no longer lists tied weights in `_keys_to_ignore_on_save`; the head is the embedding matrix,
  which was loaded, so the warning is dropped for exactly those keys.
With --zo_carry_perturbation the weights rest perturbed between steps; `evaluate`, `save_model`, loading the best
model, the last step and `train`'s exit put them back first.  With --zo_offload cpu (zo.offload) the decoder blocks
rest in host memory and stream through the device; the same points first apply every block's pending update.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import threading
import time
import warnings
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback

import evaluator
import metrics
import parallel
import zo
from adapters import adapter_of
from args import ZOArguments
from utils import ListDataset, Objective, candidate_scores, loss_weight, training_loss

logger = logging.getLogger(__name__)


@dataclass
class TaskEval:
    """What dev evaluation needs besides the model: the task, its dev samples and evaluator settings."""
    task: object
    samples: list
    tokenizer: object
    tokens: object
    settings: evaluator.EvalSettings


class StopOnSignal(TrainerCallback):
    """SIGTERM, SIGINT or SIGUSR1 during training: finish the current step, save a complete checkpoint, stop.
    `received` is the signal (None if none came). A second signal of the same kind stops at once, as without us.
    With several processes the ranks agree at every step end, so all stop after the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = None
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.received is not None:
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        logger.warning("%s received: saving a checkpoint at the end of this step, then stopping (send it again to "
                       "stop at once, without a checkpoint)", signal.Signals(signum).name)

    def on_step_end(self, args, state, control, **kwargs):
        agreed = parallel.max_over_ranks(self.received or 0)
        if agreed:
            self.received = agreed
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class TrainingClock(TrainerCallback):
    """What the training of this process cost: the seconds spent inside optimizer steps (from on_step_begin to
    on_step_end: the forward passes, backward or probes, and the update; not the dev evaluations or checkpoints in
    between) and the training forward passes they ran, counted where they run."""

    def __init__(self):
        self.step_seconds, self.steps, self.forwards, self._begun = 0.0, 0, 0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._begun = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._begun is not None:
            self.step_seconds += time.perf_counter() - self._begun
            self.steps, self._begun = self.steps + 1, None

    def record(self, global_step: int) -> dict:
        """The training record of a result file; `global_step` is the run's (resumed steps included)."""
        peak = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}   # Linux: KiB
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            peak["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
        per_forward = self.step_seconds / self.forwards if self.forwards else None
        return {"global_step": global_step, "steps_this_process": self.steps,
                "forward_passes_this_process": self.forwards, "step_seconds_this_process": round(self.step_seconds, 2),
                "seconds_per_forward": round(per_forward, 4) if per_forward is not None else None, **peak}


class SuiteTrainer(Trainer):
    def __init__(self, *args, objective: Objective, task_eval: TaskEval, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.task_eval = task_eval
        # our losses are token/example means of one micro-batch: HF must divide them by the accumulation steps
        self.loss_is_scaled_for_ga = False
        self.stop_on_signal = StopOnSignal()
        self.add_callback(self.stop_on_signal)
        self.clock = TrainingClock()
        self.add_callback(self.clock)

    @property
    def interrupted(self) -> int | None:
        """The signal that stopped training after a checkpoint, or None."""
        return self.stop_on_signal.received

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.stop_on_signal.restore()  # also when training fails: leave the process's handlers as they were

    def _issue_warnings_after_load(self, load_result) -> None:
        tied = _tied_names(self.model)
        load_result.missing_keys[:] = [k for k in load_result.missing_keys if k not in tied]
        super()._issue_warnings_after_load(load_result)

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.clock.forwards += 1   # one training forward, and its backward
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = training_loss(model, inputs, self.objective)
        return (loss, None) if return_outputs else loss

    def load_weights(self, checkpoint: str) -> None:
        """The trained weights (or adapter, or prefix) of a checkpoint, into the model, without training: what
        `train(resume_from_checkpoint=...)` loads first."""
        self._load_from_checkpoint(checkpoint)

    def _own_checkpoints(self, model=None):
        """The adapter of the model if its checkpoints are ours to save and load (not HF's), else None."""
        adapter = adapter_of(self.model if model is None else model)
        return adapter if adapter is not None and adapter.checkpoint_load is not None else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        adapter = self._own_checkpoints()
        if adapter is None:
            return super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            adapter.export(self.model, output_dir or self.args.output_dir, False)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        adapter = self._own_checkpoints(model)
        if adapter is None or not adapter.in_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        logger.info("Loading the %s from %s", adapter.name, resume_from_checkpoint)
        adapter.checkpoint_load(model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if parallel.is_sharded(self.model):
            return self._load_best_sharded_model()
        adapter = self._own_checkpoints()
        if adapter is None or not adapter.in_checkpoint(self.state.best_model_checkpoint):
            return super()._load_best_model()
        logger.info("Loading the best %s from %s (score: %s)", adapter.name, self.state.best_model_checkpoint,
                    self.state.best_metric)
        adapter.checkpoint_load(self.model, self.state.best_model_checkpoint)

    def _load_best_sharded_model(self) -> None:
        """--fsdp: the best checkpoint holds the full weights (transformers gathers them to save); each rank loads
        its shards of them through torch.distributed.checkpoint (HF's loader expects unsharded parameters)."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        folder = self.state.best_model_checkpoint
        logger.info("Loading the best weights from %s (score: %s)", folder, self.state.best_metric)
        weights = load_file(os.path.join(folder, "model.safetensors"))
        tied = _tied_names(self.model)
        set_model_state_dict(self.model, {k: v for k, v in weights.items() if k not in tied},
                             options=StateDictOptions(full_state_dict=True))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Dev loss and the task metric (accuracy / F1) of the dev samples, scored without demonstrations."""
        model = self.model
        was_training = model.training
        model.eval()
        results = {}
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is not None and not self.objective.non_diff:
            # each rank scores its share of the dev set (exactly once: no sampler padding), the ranks combine;
            # FSDP2 shards: every forward is a collective, so every rank scores all of it, in lockstep
            records = [dataset[i] for i in range(len(dataset))]
            share = ListDataset(records if parallel.is_sharded(model) else parallel.shard(records))
            loader = torch.utils.data.DataLoader(share, batch_size=self.args.per_device_eval_batch_size,
                                                 collate_fn=self.data_collator)
            total, weight = torch.zeros((), dtype=torch.float64), 0
            with torch.inference_mode():
                for batch in loader:
                    batch = self._prepare_inputs(batch)
                    w = loss_weight(batch, self.objective)
                    total = total + training_loss(model, batch, self.objective).double().cpu() * w
                    weight += w
            mean = total / weight if weight else total
            results[f"{metric_key_prefix}_loss"] = parallel.mean_over_ranks(mean, weight).item()
        te = self.task_eval
        if te.samples:
            scores, _ = evaluator.evaluate(model, te.tokenizer, te.tokens, te.task, [[]] * len(te.samples),
                                           te.samples, te.settings)
            results.update({f"{metric_key_prefix}_{k}": v for k, v in scores.items()})
        if was_training:
            model.train()
        self.log(results)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, results)
        return results


def _tied_names(model) -> set[str]:
    """Names under which a parameter appears that is also registered under an earlier name (a tied head)."""
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


MAX_CONSECUTIVE_SKIPS = 20  # non-finite steps in a row after which a run counts as diverged


class ZOTrainer(SuiteTrainer):
    max_consecutive_skips = MAX_CONSECUTIVE_SKIPS

    def __init__(self, *args, zo_args: ZOArguments, **kwargs):
        self.zo_args = zo_args
        # --zo_offload cpu: the blocks move to host memory before HF's Trainer places the model (the Offloader's
        # device map tells it and accelerate to leave them there); a CPU device gets the stand-in (tests)
        self.offloader = None
        if zo_args.zo_offload != "none":
            from zo.offload import Offloader
            device = kwargs["args"].device if "args" in kwargs else args[1].device
            if device.type != "cuda":
                logger.warning("--zo_offload %s without a CUDA device: the blocks stream to a CPU stand-in (the same "
                               "code path; no memory is saved)", zo_args.zo_offload)
            self.offloader = Offloader(kwargs["model"] if "model" in kwargs else args[0], device)
        super().__init__(*args, **kwargs)
        self._consecutive_skips = 0
        self._skips_seen = 0
        self.add_callback(_ZOLogCallback(self))
        # the Trainer's accelerator, set up above, has initialised the process group of a torchrun launch
        self.by_directions = zo_args.zo_parallel == "directions" and parallel.initialised()
        self.num_directions = zo_args.num_directions()
        # the directions this process probes on each batch
        self.directions = parallel.directions_of_rank(self.num_directions) if self.by_directions \
            else range(self.num_directions)
        if self.by_directions:
            self.add_callback(_ShareDirections(self))

    def get_train_dataloader(self):
        """Direction parallelism: every rank takes the whole batch (the one process's batches, in its order), so the
        sampler shard accelerate adds is made a passthrough, as transformers does for its rank-aware samplers."""
        loader = super().get_train_dataloader()
        if self.by_directions:
            shard = getattr(loader, "batch_sampler", None)
            if shard is None or not hasattr(shard, "num_processes"):
                raise RuntimeError(f"--zo_parallel directions: the training data loader's batch sampler "
                                   f"({type(shard).__name__}) is not accelerate's shard; cannot give every rank the "
                                   f"whole batch")
            shard.num_processes, shard.process_index = 1, 0
        return loader

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            kwargs = self.zo_args.optimizer_kwargs(self.state.max_steps or self.args.max_steps)
            self.optimizer = self.zo_args.optimizer_class()(
                zo.param_groups_for_model(model, self.args.weight_decay), lr=self.args.learning_rate,
                seed=self.args.seed, **kwargs)
            if self.optimizer.probe_mode != "inplace":
                self.optimizer.attach(model)   # --zo_probe forward / onepass: refuses unhandled modules by name
            if self.offloader is not None:
                self.offloader.bind(self.optimizer)   # streamed tensors: updated when their block next arrives
                logger.info("--zo_offload: %s", {k: f"{v / 2 ** 20:.1f} MiB" if k != "blocks" else v
                                                 for k, v in self.offloader.memory().items()})
        return self.optimizer

    def _probe_loss(self, model, inputs):
        """The probe loss of the global batch: with several processes (data-parallel ZO) each rank's loss of its
        shard, combined over the ranks by what each averages over, so every rank finds the same projected gradient.
        --zo_probe onepass: (ℓ+, ℓ-) of one forward of the doubled batch (counted as the two probes it replaces),
        each half combined over the ranks on its own."""
        probe = self._zo_optimizer.forward_probe if self._zo_optimizer.probe_mode == "onepass" else None
        if self.objective.non_diff:
            self.clock.forwards += 1
            loss = non_diff_loss(model, inputs, self.task_eval)
        else:
            with self.compute_loss_context_manager():
                loss_of = lambda m: training_loss(m, inputs, self.objective)   # noqa: E731
                loss = loss_of(model) if probe is None else probe.losses(model, loss_of)
            self.clock.forwards += 2 if isinstance(loss, tuple) else 1
        parallel.reshard(model)  # FSDP2: the next perturbation must reach what the next forward gathers
        if self.by_directions:
            return loss  # the whole batch on every rank: nothing to combine
        weight = loss_weight(inputs, self.objective)
        if isinstance(loss, tuple):
            return tuple(parallel.mean_over_ranks(part, weight) for part in loss)
        return parallel.mean_over_ranks(loss, weight)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Probes run in eval mode (dropout off) so both see the same function of the parameters.
        model.eval()
        inputs = self._prepare_inputs(inputs)
        loss_plus = self._zo_optimizer.probe_directions(lambda: self._probe_loss(model, inputs), self.directions)
        return loss_plus.detach() / self.current_gradient_accumulation_steps

    @property
    def _zo_optimizer(self) -> zo.ZOOptimizer | None:
        optimizer = self.optimizer
        while optimizer is not None and not isinstance(optimizer, zo.ZOOptimizer):  # accelerate wraps it
            optimizer = getattr(optimizer, "optimizer", None)
        return optimizer

    def settle(self) -> None:
        """Put the weights back at θ if the next step's perturbation rests on them (--zo_carry_perturbation), and
        apply and write back every streamed block's pending update (--zo_offload: the host copy is what is saved).
        Called before anything reads the weights: evaluation, saving, loading the best model, the end of training."""
        optimizer = self._zo_optimizer
        if optimizer is not None and optimizer.carried:
            optimizer.settle()
        if self.offloader is not None:
            self.offloader.flush()

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self.settle()  # also when training stops with an error: never leave the model perturbed

    def evaluate(self, *args, **kwargs):
        self.settle()
        return super().evaluate(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self.settle()
        with warnings.catch_warnings():
            # --zo_offload: the device map says "cpu" for the streamed blocks, which the host copy saves as it is
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            return super().save_model(output_dir, _internal_call)

    def _load_best_model(self) -> None:
        self.settle()  # otherwise a later settle would subtract this step's perturbation from the loaded weights
        return super()._load_best_model()

    def log(self, logs, start_time=None):
        """Training log lines also carry the last projected gradient and loss at θ-εu, the skip count,
        ZO-AdaMU's schedule and, with 16-bit weights, the share of the last step's element updates that rounded to
        nothing (update_rounded_away: their new value rounds to the old one); there is no gradient norm to report."""
        if "loss" in logs:
            logs.pop("grad_norm", None)
            optimizer = self._zo_optimizer
            if optimizer.last_projected_grad is not None:
                logs["projected_grad"] = float(optimizer.last_projected_grad)
                logs["loss_minus"] = float(optimizer.last_loss_minus)
            logs["skipped_steps"] = int(optimizer.skipped_steps)
            if optimizer.last_rounded_away is not None:
                logs["update_rounded_away"] = round(float(optimizer.last_rounded_away), 6)
            logs.update({k: round(v, 6) for k, v in optimizer.last_schedule.items()})
        super().log(logs, start_time)

    def check_skips(self) -> None:
        """Stop with a clear error when the projected gradient keeps coming out non-finite."""
        optimizer = self._zo_optimizer
        skipped = int(optimizer.skipped_steps)
        if skipped > self._skips_seen:
            self._consecutive_skips += skipped - self._skips_seen
            logger.warning("ZO step %d skipped: non-finite loss or projected gradient (%d skipped in total)",
                           self.state.global_step, skipped)
        else:
            self._consecutive_skips = 0
        self._skips_seen = skipped
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise RuntimeError(f"{self._consecutive_skips} ZO steps in a row had a non-finite loss or projected "
                               f"gradient; the run diverged. Lower --learning_rate or --zo_eps, or load the weights "
                               f"in fp32/bf16 instead of fp16.")


class _ShareDirections(TrainerCallback):
    """Direction parallelism: before each update, every rank gets the measurements of all the step's directions."""

    def __init__(self, trainer: ZOTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        parallel.share_directions(self.trainer._zo_optimizer, self.trainer.num_directions)


class _ZOLogCallback(TrainerCallback):
    def __init__(self, trainer: ZOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_training_stop or state.global_step >= state.max_steps:
            self.trainer.settle()  # the last step: nothing will consume the carried perturbation
        self.trainer.check_skips()


@torch.inference_mode()
def non_diff_loss(model, inputs, task_eval: TaskEval) -> torch.Tensor:
    """Minus the batch-mean task metric of the model's own predictions (greedy generations or argmax candidates)."""
    spec = task_eval.task.spec
    tokenizer, tokens = task_eval.tokenizer, task_eval.tokens
    if spec.generation:
        prompts = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        predictions = evaluator.generate_batch(model, tokenizer, tokens, prompts, task_eval.settings.generation)
        scores = [metrics.example_score(spec.metric, p, g) for p, g in zip(predictions, inputs["gold"])]
        return torch.tensor(-sum(scores) / len(scores), dtype=torch.float32)
    # classification: accuracy of the first-argmax candidate by length-normalised likelihood, as the evaluator
    likelihood = candidate_scores(model, inputs)
    correct, start = [], 0
    for label, count in zip(inputs["labels"].tolist(), inputs["num_options"].tolist()):
        correct.append(likelihood[start:start + count].argmax() == label)
        start += count
    return -torch.stack(correct).float().mean()
