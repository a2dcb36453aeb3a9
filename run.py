"""Command-line entry point: zero-shot / in-context-learning evaluation and fine-tuning of causal LMs.

    python run.py --task_name SST2 --num_train 4 --num_eval 100            # 4-shot ICL on the embedded model
    python run.py --help                                                   # the suite's flags, then Hugging Face's

A run: every flag is parsed and checked (args.py) and the run's folders, checkpoint and result paths are planned
(runs.py) before anything loads, so a bad command line ends with exit status 2, every problem listed, and nothing
written. Then the task and the model load, each train set trains (resuming from its newest complete checkpoint) and
is evaluated, and the result file is written. SIGTERM, SIGINT or SIGUSR1 during training save a checkpoint and stop
with the command that resumes; before the run has written anything, they stop it with one line saying what was
interrupted (`BeforeWriting`).
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import set_seed

import args as arguments
import evaluator
from adapters import ADAPTERS
import models
import parallel
import provenance
import runs
import tasks
import trainer_zo
import utils

logger = logging.getLogger("run")


@dataclass
class Plan:
    """What a run will write and resume, decided before anything loads."""
    num_sets: int
    resume: list[runs.ResumePlan] = field(default_factory=list)   # one per train set (training only)


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    BEFORE_WRITING.begin()
    status = None
    try:
        status = checked_and_executed(sys.argv[1:] if argv is None else argv)
        return status
    except Interrupted as stop:
        logger.error("%s", stop)
        return stop.status
    finally:
        BEFORE_WRITING.end()
        parallel.finish(clean=status == 0)


def checked_and_executed(argv: list[str]) -> int:
    try:
        config = arguments.parse(argv)
        agree_across_ranks(config)
        plan = preflight(config)
    except arguments.UsageError as error:  # a flag, or a folder, checkpoint or result path (runs.py)
        logger.error("%s", error.report("nothing was run or written"))
        return 2
    BEFORE_WRITING.training = config.training
    try:
        return execute(config, plan)
    except arguments.UsageError as error:  # found once the data are loaded (--num_dev takes the whole draw)
        logger.error("%s", error.report("the run stopped"))
        return 2
    except (tasks.DataError, models.ModelLoadError, evaluator.PromptTooLong) as error:
        logger.error("%s", error)
        return 2


class Interrupted(BaseException):
    """A stop signal before the run wrote anything. (BaseException, as KeyboardInterrupt: no `except Exception` in
    a library may take it for an error of its own.)"""

    def __init__(self, signum: int, doing: str, training: bool):
        self.status = 128 + signum
        when = f"{doing}, before training began" if training else doing
        super().__init__(f"{signal.Signals(signum).name} while {when}: stopped; nothing was written, so there is "
                         f"nothing to resume (exit status {self.status}).")


class BeforeWriting:
    """SIGTERM, SIGINT or SIGUSR1 before the run writes anything (checking the command line, loading the data and the
    model, preparing to train, an evaluation whose result is not written yet) ends it with one line saying what was
    interrupted, where their default actions would end it without a word (SIGTERM, SIGUSR1) or with a traceback
    (SIGINT). Ended before training starts (trainer_zo.StopOnSignal then checkpoints and stops, and puts back the
    handlers it found: the process's own) and before the first result or probe is written."""

    def __init__(self):
        self.doing, self.training = "checking the command line", False
        self._previous: dict[int, object] = {}

    def begin(self) -> None:
        self.doing, self.training = "checking the command line", False
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            self._previous = {s: signal.signal(s, self._stop) for s in trainer_zo.StopOnSignal.SIGNALS}

    def _stop(self, signum, frame):
        self.end()  # a second signal takes its default action
        raise Interrupted(signum, self.doing, self.training)

    def end(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


BEFORE_WRITING = BeforeWriting()


# Libraries that attach a stream handler of their own to their logger and still pass each record on to the root
# logger: every warning of theirs (the hub's retries, for one) was printed twice.
OWN_HANDLERS = ("huggingface_hub", "datasets")


def configure_logging() -> None:
    """Every record once, on stderr, in one format."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for name in OWN_HANDLERS:
        importlib.import_module(name)  # the handler is attached on import: a later import would attach it again
        library = logging.getLogger(name)
        if library.propagate:  # the root handler prints its records
            for handler in [h for h in library.handlers if type(h) is logging.StreamHandler]:
                library.removeHandler(handler)


def agree_across_ranks(config: arguments.RunConfig) -> None:
    """Under torchrun / accelerate launch: set up the process group (the HF Trainer's setup: gloo on CPUs, NCCL on
    GPUs) and check that every rank runs the same configuration (the seed, the optimizer and its settings ...) before
    anything loads, rather than discovering it as ranks that drift apart."""
    if parallel.launched_world_size() <= 1:
        return
    config.hf.device  # noqa: B018  (initialises torch.distributed through accelerate's PartialState)
    problem = parallel.agree(config.identity(), "the run's configuration")
    if problem:
        raise arguments.UsageError([problem])


def preflight(config: arguments.RunConfig) -> Plan:
    """Every check that needs no model and no data: the model name, the data folder, where results and checkpoints
    go and which checkpoint a training run resumes from."""
    problems = []
    task = config.task
    problem = models.model_name_problem(config.model.model_name)
    if problem:
        problems.append(problem)
    try:
        tasks.resolve_data_dir(task.data_dir)
    except tasks.DataError as error:
        problems.append(str(error))
    num_sets = 1 if task.train_set_seed is not None else (task.num_train_sets or 1)
    if config.evaluation.final_eval:
        if task.result_file:
            problem = runs.writable_problem(Path(task.result_file), "file", "--result_file")
        else:
            problem = runs.writable_problem(Path("result"), "folder", "the result folder")
        if problem:
            problems.append(problem)
    plan = Plan(num_sets)
    if config.training:
        identity = config.identity()
        for index in range(num_sets):
            folder = runs.output_dir(config, index, num_sets)
            problem = runs.writable_problem(folder, "folder", "--output_dir")
            if problem:
                problems.append(problem)
                continue
            try:
                resume = runs.plan_resume(folder, identity, overwrite=config.train.overwrite_output_dir,
                                          explicit=config.hf.resume_from_checkpoint)
            except arguments.UsageError as error:
                problems += error.problems
                continue
            if resume.checkpoint is not None and config.fsdp:
                problems.append(f"{resume.checkpoint} holds the weights of an --fsdp run without its optimizer "
                                f"state (transformers cannot checkpoint it), so the run cannot resume from it. Pass "
                                f"--overwrite_output_dir to start over, or --output_dir with another folder.")
            plan.resume.append(resume)
    if parallel.max_over_ranks(bool(problems)):  # all ranks stop together, whichever found the problem
        raise arguments.UsageError(problems or ["Another process found a problem with this command (see its log)."])
    return plan


def execute(config: arguments.RunConfig, plan: Plan) -> int:
    task_args, hf = config.task, config.hf
    started = time.time()
    set_seed(hf.seed)
    BEFORE_WRITING.doing = f"loading the {task_args.task_name} data"
    task = tasks.load_task(task_args.task_name, task_args.data_dir, task_args.hub_dataset)
    notices = [task.warning] if task.warning else []
    clipped = task.clipped(task_args.num_train, task_args.num_dev, task_args.num_eval)
    for name, clip in clipped.items():
        notices.append(f"--{name} {clip['requested']} -> {clip['used']} ({clip['why']})")
        logger.warning("!!! --%s %d: only %d used: %s.", name, clip["requested"], clip["used"], clip["why"])
    _, train_sets = task.sample_train_sets(task_args.num_train, task_args.num_dev, task_args.num_eval,
                                           task_args.num_train_sets, task_args.train_set_seed)
    BEFORE_WRITING.doing = "loading the model"
    tokenizer = models.load_tokenizer(config.model.model_name)
    try:
        model = load_model(config)
    except ValueError as error:  # a model the chosen mode cannot handle (LoRA targets, prefix model types, ...)
        raise models.ModelLoadError(str(error)) from None
    tokens = models.tokenizer_settings(tokenizer, model.config, opt_bos_fix=config.model.opt_bos_fix)
    evaluation = config.evaluation
    settings = evaluator.EvalSettings(
        max_length=config.model.max_length, sfc=evaluation.sfc, icl_sfc=evaluation.icl_sfc,
        batch_size=hf.per_device_eval_batch_size, verbose=evaluation.verbose, show_progress=not hf.disable_tqdm,
        generation=evaluator.GenerationOptions(
            max_new_tokens=evaluation.max_new_tokens, sampling=evaluation.sampling,
            temperature=evaluation.temperature, num_beams=evaluation.num_beams, top_p=evaluation.top_p,
            top_k=evaluation.top_k, max_length=config.model.max_length, eos_token=evaluation.eos_token))
    # prompt_version: the revision of the task's prompt format (templates.Template.version), as lm-eval records a
    # task's version; report.py never mixes results of two versions in one configuration
    base = {"config": config.as_dict(), "run_id": config.run_id(), "data_source": task.source,
            "prompt_version": task.spec.template.version, "clipped": clipped,
            "provenance": provenance.collect(model, started)}
    BEFORE_WRITING.doing = "preparing to train" if config.training else "evaluating"

    if config.training:
        for set_index, train_samples in enumerate(train_sets):
            seed = task_args.train_set_seed if task_args.train_set_seed is not None else set_index
            eval_samples = task.sample_subset("validation", seed, task_args.num_eval)
            if set_index > 0:  # every train set starts from the pretrained weights
                model = load_model(config)
            result, interrupted = train_and_evaluate(config, plan.resume[set_index], task, model, tokenizer, tokens,
                                                     train_samples, eval_samples, settings)
            if interrupted is not None:
                return interrupted
            if result is not None:
                metrics, records, sizes, training = result
                # run_dir: where report.py finds the run's training curves (trainer_state.json)
                finish(config, metrics, records, base | {"train_set_seed": seed, "sizes": sizes,
                                                         "run_dir": str(plan.resume[set_index].folder),
                                                         **({"training": training} if training else {})},
                       f"trainset{set_index}", plan.num_sets, notices)
    elif task_args.train_set_seed is not None or task_args.num_train_sets is not None:
        for set_index, train_samples in enumerate(train_sets):
            seed = task_args.train_set_seed if task_args.train_set_seed is not None else set_index
            eval_samples = task.sample_subset("validation", seed, task_args.num_eval)
            metrics, records = evaluator.evaluate(model, tokenizer, tokens, task, [train_samples] * len(eval_samples),
                                                  eval_samples, settings)
            sizes = {"train": len(train_samples), "dev": 0, "eval": len(eval_samples)}
            finish(config, metrics, records, base | {"train_set_seed": seed, "sizes": sizes}, f"trainset{set_index}",
                   plan.num_sets, notices)
    else:
        eval_samples = task.sample_subset("validation", 0, task_args.num_eval)
        metrics, records = evaluator.evaluate(model, tokenizer, tokens, task, train_sets, eval_samples, settings)
        sizes = {"train": min(task_args.num_train, len(task.samples["train"])), "dev": 0, "eval": len(eval_samples)}
        finish(config, metrics, records, base | {"sizes": sizes}, "onetrainpereval", 1, notices)
    return 0


def load_model(config: arguments.RunConfig):
    """The pretrained model with the requested parameter-efficient mode applied and everything else frozen."""
    model_args = config.model
    world = parallel.launched_world_size()
    model = models.load_model(model_args.model_name, float16=model_args.load_float16,
                              bfloat16=model_args.load_bfloat16, int8=model_args.load_int8,
                              untie_emb=model_args.untie_emb,
                              # --zo_offload: loaded in host memory; the trainer's Offloader places it
                              auto_device=model_args.auto_device and config.zo.zo_offload == "none",
                              device=config.hf.device if world > 1 else None,
                              fsdp_size=world if config.fsdp else 1,
                              fsdp_offload="offload" in arguments.fsdp_options(config))
    adapter = ADAPTERS.get(config.mode)
    return adapter.apply(model, config) if adapter is not None else model


def split_dev(config: arguments.RunConfig, train_samples):
    """Dev is the tail of the train draw, as in the reference."""
    num_dev = config.task.num_dev
    if num_dev is None:
        return train_samples, None
    train, dev = train_samples[:len(train_samples) - num_dev], train_samples[len(train_samples) - num_dev:]
    if not train:
        raise arguments.UsageError([f"No training examples left: the draw has {len(train_samples)} rows and --num_dev "
                                    f"{num_dev} takes them all. Lower --num_dev."])
    return train, dev


def build_trainer(config: arguments.RunConfig, task, model, tokenizer, tokens, train_samples, dev_samples, settings,
                  output_dir: Path):
    """The HF Trainer (regular or ZO) for one train set, with dev evaluation by the task metric and the checkpoint
    bookkeeping of runs.py."""
    train = config.train
    objective = utils.Objective(classification=train.train_as_classification, only_option=train.only_train_option,
                                non_diff=train.non_diff)
    build = lambda samples: utils.ListDataset(utils.build_train_records(  # noqa: E731
        task, samples, tokenizer, tokens, objective, config.model.max_length, config.evaluation.max_new_tokens))
    training_args = copy.copy(config.hf)
    training_args.output_dir = str(output_dir)
    training_args.remove_unused_columns = False   # records carry option lengths the model does not take
    # --fsdp: the model was sharded when it was loaded (load_model); Hugging Face must not shard it again
    training_args.fsdp, training_args.fsdp_config = [], {}
    training_args.save_total_limit = None         # runs.CheckpointCallback rotates, after a save is complete
    if not torch.cuda.is_available():
        training_args.dataloader_pin_memory = False
    if dev_samples is None and training_args.eval_strategy != "no":
        logger.warning("No --num_dev: evaluation during training is turned off so the test subset never drives "
                       "checkpoint selection.")
        training_args.eval_strategy = "no"
    common = dict(model=model, args=training_args, train_dataset=build(train_samples),
                  eval_dataset=build(dev_samples) if dev_samples else None,
                  data_collator=utils.TrainCollator(tokens.pad_id), objective=objective,
                  task_eval=trainer_zo.TaskEval(task, dev_samples or [], tokenizer, tokens, settings),
                  callbacks=[runs.CheckpointCallback(config.identity(), config.run_id(), config.hf.save_total_limit)])
    if train.trainer != "zo":
        return trainer_zo.SuiteTrainer(**common)
    training_args.max_grad_norm = 0.0   # there are no gradients to clip
    training_args.ddp_broadcast_buffers = False  # ranks hold identical buffers; nothing to send per forward
    return trainer_zo.ZOTrainer(zo_args=config.zo, **common)


def train_and_evaluate(config: arguments.RunConfig, resume: runs.ResumePlan, task, model, tokenizer, tokens,
                       train_samples, eval_samples, settings):
    """Train on one train set (dev carved from its tail), then evaluate test and dev without demonstrations.
    Returns ((metrics, records, sizes, training record or None) or None without a final evaluation, the exit status
    of an interrupted run or None)."""
    train_samples, dev_samples = split_dev(config, train_samples)
    if config.train.linear_probing:
        objective = utils.Objective(only_option=True)
        records = utils.build_train_records(task, train_samples, tokenizer, tokens, objective, config.model.max_length)
        BEFORE_WRITING.end()  # the probe is fitted and saved without a Trainer: a signal takes its own course
        fit_probe(config, model, utils.ListDataset(records), tokens, resume.folder)
        result = evaluate_after_training(config, task, model, tokenizer, tokens, train_samples, dev_samples,
                                         eval_samples, settings)
        return (None if result is None else (*result, None)), None
    for problem in resume.skipped:
        logger.warning("Skipping a checkpoint that cannot be resumed from: %s", problem)
    if config.hf.process_index == 0:
        runs.apply_wipe(resume)
    parallel.barrier()
    trainer = build_trainer(config, task, model, tokenizer, tokens, train_samples, dev_samples, settings,
                            resume.folder)
    BEFORE_WRITING.end()  # before train() installs the handlers that checkpoint, and puts back the ones it found
    if resume.checkpoint is not None and runs.finished(resume.checkpoint):
        weights = runs.final_weights(resume.checkpoint, config.hf.load_best_model_at_end)
        logger.info("%s is the last step of this run: nothing left to train; evaluating the weights of %s",
                    resume.checkpoint, weights)
        trainer.load_weights(str(weights))
    else:
        if resume.checkpoint is not None:
            logger.info("Resuming from %s", resume.checkpoint)
        trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume.checkpoint else None)
        if trainer.interrupted is not None:
            name = signal.Signals(trainer.interrupted).name
            logger.warning("%s: stopped after step %d with a complete checkpoint in %s. Resume with:\n  %s", name,
                           trainer.state.global_step, resume.folder, resume_command(config))
            return None, 128 + trainer.interrupted
        trainer.save_state()  # the whole log history in the run folder: report.py draws its curves from it
    if config.train.save_model:
        save_trained_model(config, trainer, resume.folder)
    global_step = trainer.state.global_step or (runs.saved_step(resume.checkpoint) if resume.checkpoint else 0)
    result = evaluate_after_training(config, task, trainer.model, tokenizer, tokens, train_samples, dev_samples,
                                     eval_samples, settings)
    record = trainer.clock.record(global_step)
    if getattr(trainer, "offloader", None) is not None:   # --zo_offload: what streamed, and the bytes it moved
        record["offload"] = trainer.offloader.report()
    return (None if result is None else (*result, record)), None


def resume_command(config: arguments.RunConfig) -> str:
    """The command that continues this run: the same command line (the run resumes its newest checkpoint)."""
    script = os.path.relpath(Path(__file__).resolve())
    size = parallel.launched_world_size()
    launcher = ["python"] if size == 1 else ["torchrun", f"--nproc_per_node={size}"]
    return shlex.join([*launcher, script, *config.argv]) + ("" if size == 1 else "   (or your multi-node launch "
                                                                                "command, with the same flags)")


def fit_probe(config: arguments.RunConfig, model, dataset, tokens, output_dir: Path) -> None:
    """Linear probing replaces training: a logistic-regression head fitted on frozen option-token features."""
    import heads
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.hf.per_device_train_batch_size, shuffle=False,
                                         collate_fn=utils.TrainCollator(tokens.pad_id))
    probe = heads.fit_linear_probe(model, loader, early_stopping=config.train.lp_early_stopping)
    heads.apply_linear_probe(model, probe)
    logger.info("Linear probe: C=%s over %d class tokens", probe.C, len(probe.class_token_ids))
    if config.train.save_model:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.save(output_dir / "linear_probe.pt")


def evaluate_after_training(config: arguments.RunConfig, task, model, tokenizer, tokens, train_samples, dev_samples,
                            eval_samples, settings):
    """Test metrics without demonstrations, plus dev metrics under a dev_ prefix."""
    if not config.evaluation.final_eval:
        return None
    model.eval()
    metrics, records = evaluator.evaluate(model, tokenizer, tokens, task, [[]] * len(eval_samples), eval_samples,
                                          settings)
    if dev_samples:
        dev_metrics, _ = evaluator.evaluate(model, tokenizer, tokens, task, [[]] * len(dev_samples), dev_samples,
                                            settings)
        metrics |= {f"dev_{k}": v for k, v in dev_metrics.items()}
    sizes = {"train": len(train_samples), "dev": len(dev_samples or []), "eval": len(eval_samples)}
    return metrics, records, sizes


def save_trained_model(config: arguments.RunConfig, trainer, output_dir: Path) -> None:
    """Only the adapter or prefix for parameter-efficient modes (LoRA merged into full weights with
    --save_merged); full weights otherwise."""
    adapter = ADAPTERS.get(config.mode)
    if adapter is None or not adapter.export(trainer.model, str(output_dir), config.peft.save_merged):
        trainer.save_model(str(output_dir))
    parallel.barrier()  # an adapter is exported by every rank: touch the files once all of them are written
    if trainer.args.should_save:
        runs.weights_follow_umask(output_dir)


def finish(config: arguments.RunConfig, metrics: dict, records: list[dict], extra: dict, suffix: str, num_sets: int,
           notices: list[str]) -> None:
    """Write the result file and one summary line that repeats what the run's log may have buried: the data source
    and every clipped size."""
    BEFORE_WRITING.end()  # a result is written now: from here a signal takes its own course
    summary = [json.dumps(metrics), f"{extra['sizes']['eval']} eval examples", f"data {extra['data_source']}"]
    if config.evaluation.final_eval and config.hf.process_index == 0:
        path = runs.result_path(config, suffix, extra["sizes"], num_sets)
        extra = extra | {"provenance": provenance.finished(extra["provenance"])}
        if "run_dir" in extra:  # relative to the result file, so a results folder can be moved with its runs
            extra["run_dir"] = os.path.relpath(Path(extra["run_dir"]).absolute(), path.absolute().parent)
        path = runs.write_result(path, metrics | extra | {"predictions": records}, config.run_id())
        summary.append(f"wrote {path}")
    summary += [f"NOTE {n}" for n in notices]
    if config.hf.process_index == 0:  # every rank evaluated the same examples: one summary for the run
        logger.info("===== %s: %s =====", config.task.task_name, " | ".join(summary))


if __name__ == "__main__":
    sys.exit(main())
