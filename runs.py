"""What a run writes and what it may reuse: its folder, its checkpoints and its result file.

A run is defined by its identity (`args.RunConfig.identity()`: every flag that changes what it computes) and named by
a hash of it (`run_id`).
* **Its folder.** Unless `--output_dir` is given, checkpoints go to `result/output/<readable name>-<run_id>/`, so two
  runs that differ in anything that matters never share a folder. The folder's `run_config.json` names the run that
  owns it; every checkpoint records the same identity.
* **Resuming.** A rerun of the same command resumes from the newest checkpoint that is complete (its marker
  `checkpoint_complete.json`, written last, lists every file with its size, and the files are all there at those
  sizes) and loadable (its trainer state parses). Broken checkpoints are skipped with a warning naming the file. A
  folder or checkpoint of another run, or a folder with only broken checkpoints, stops the run before anything loads,
  with the differences and the two ways out (`--overwrite_output_dir`, or another `--output_dir`).
* **Rotation.** `--save_total_limit` is applied here after the marker is written (the newest complete checkpoints and
  the best one stay), never before: Hugging Face's own rotation runs before a save is finished, so a kill at that
  moment could leave no complete checkpoint at all.
* **Results.** `result/<name>.json` names what distinguishes the run; a file there from another run (another
  `run_id`) is never replaced: the new result is written beside it with the run id in its name, and a warning says so.
  Files are written atomically and with the permissions the umask allows (weights too: see `weights_follow_umask`).
* **Checkpoint names.** Hugging Face names the checkpoint of step N `checkpoint-N` (`PREFIX_CHECKPOINT_DIR`);
  `checkpoint_name` and `checkpoint_step` are the only places this suite writes or reads that name (report.py too).

A problem found here is a `cli.UsageError` (also importable under its old name `RunError`), as a problem with a flag
is: run.py reports both as "N problems with this command".
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import parallel
from cli import UsageError

logger = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"
MARKER = "checkpoint_complete.json"
TRAINER_STATE = "trainer_state.json"
# the pattern of transformers.trainer_utils.get_last_checkpoint
_CHECKPOINT = re.compile(rf"^{re.escape(PREFIX_CHECKPOINT_DIR)}-(\d+)$")

RunError = UsageError  # the old name of a problem found here: one class with the flags' (run.py reports both alike)


# --- names --------------------------------------------------------------------------------------------------------

def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(config) -> str:
    """The readable part of a training run's name: mode, optimizer, learning rate, ε, length, batch and seed."""
    hf = config.hf
    trainer = config.zo.zo_optim if config.train.trainer == "zo" else config.train.trainer
    parts = [trainer, config.mode, f"lr{_number(hf.learning_rate)}"]
    if config.train.trainer == "zo":
        parts.append(f"eps{_number(config.zo.zo_eps)}")
        if config.zo.zo_num_directions is not None:
            parts.append(f"dirs{config.zo.zo_num_directions}")
        if config.zo.zo_stochastic_rounding:   # the default leaves names as they were
            parts.append("sr")
        if config.zo.zo_probe != "inplace":   # ditto
            parts.append(config.zo.zo_probe)
    parts.append(f"steps{hf.max_steps}" if hf.max_steps > 0 else f"ep{_number(hf.num_train_epochs)}")
    # the global batch: what a step averages over, however it is split into processes and micro-batches
    batch = hf.per_device_train_batch_size * hf.gradient_accumulation_steps
    if config.zo.zo_parallel == "data":  # direction parallelism gives every rank the same batch
        batch *= parallel.launched_world_size()
    parts += [f"bs{batch}", f"seed{hf.seed}"]
    return "-".join(parts)


def model_label(model_name: str) -> str:
    return os.path.basename(model_name.rstrip("/")) or model_name


def result_name(config, suffix: str, sizes: dict | None = None) -> str:
    """MeZO's result name, {task}-{model}[-sfc][-icl_sfc][-sampleeval{n}][-ntrain{n}][-ndev{n}][-{tag}]-{suffix}.json,
    where a training run without --tag gets the readable description of `describe` as its tag (two runs differing in
    optimizer, learning rate, ε, steps, batch or seed must not share a name). `sizes` (the sizes actually used) name
    the evaluation set when the data had fewer rows than asked for."""
    task, evaluation = config.task, config.evaluation
    parts = [task.task_name, model_label(config.model.model_name)]
    if evaluation.sfc:
        parts.append("sfc")
    if evaluation.icl_sfc:
        parts.append("icl_sfc")
    if task.num_eval is not None:
        parts.append(f"sampleeval{sizes['eval'] if sizes else task.num_eval}")
    if task.num_train > 0:
        parts.append(f"ntrain{task.num_train}")
    if task.num_dev is not None:
        parts.append(f"ndev{task.num_dev}")
    tag = task.tag or (describe(config) if config.training else "")
    if tag:
        parts.append(tag)
    return "-".join(parts) + f"-{suffix}.json"


def result_path(config, suffix: str, sizes: dict | None = None, num_sets: int = 1) -> Path:
    if config.task.result_file:
        path = Path(config.task.result_file)
        # several train sets and one --result_file: one file per set, never one overwriting the next
        return path.with_name(f"{path.stem}-{suffix}{path.suffix}") if num_sets > 1 else path
    return Path("result") / result_name(config, suffix, sizes)


def output_dir(config, set_index: int, num_sets: int) -> Path:
    """Where this train set's checkpoints go."""
    if "output_dir" in config.given:
        base = Path(config.hf.output_dir)
    else:
        label = "-".join(p for p in (config.task.task_name, model_label(config.model.model_name), describe(config),
                                     config.task.tag) if p)
        base = Path("result") / "output" / f"{label}-{config.run_id()}"
    return base / f"trainset{set_index}" if num_sets > 1 else base


# --- checkpoints --------------------------------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    """The name of the folder Hugging Face saves the checkpoint of `step` in: checkpoint-N."""
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def checkpoint_step(path: Path | str) -> int | None:
    """N, where the last part of `path` is a checkpoint's name (checkpoint-N), else None. The name alone: a checkpoint
    passed with --resume_from_checkpoint may be called anything (`saved_step` reads the step it records)."""
    match = _CHECKPOINT.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(N, path) of the checkpoint-N folders in `folder`, newest (highest N) first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(step, p) for p in folder.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None]
    return sorted(found, reverse=True)


def saved_step(checkpoint: Path) -> int:
    """The optimizer step a (complete: `checkpoint_problem`) checkpoint was saved at, as its trainer state records."""
    return int(json.loads((Path(checkpoint) / TRAINER_STATE).read_text())["global_step"])


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (naming the file), or None if it is complete and loadable."""
    marker = checkpoint / MARKER
    if not marker.is_file():
        return f"{checkpoint} has no {MARKER} (it was interrupted while being saved, or predates this check)"
    try:
        record = json.loads(marker.read_text())
        files = record["files"]
    except (ValueError, KeyError, TypeError):
        return f"{marker} is not a valid completion record"
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written (truncated or replaced)"
    try:
        json.loads((checkpoint / TRAINER_STATE).read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{checkpoint / TRAINER_STATE} does not parse"
    return None


def finished(checkpoint: Path) -> bool:
    """Whether a checkpoint is the last step of its run. Hugging Face would still run one more step when asked to
    resume from it (when the run ends inside an epoch), so a finished run is evaluated from it instead."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    return 0 < state.get("max_steps", 0) <= state["global_step"]


def final_weights(checkpoint: Path, load_best: bool) -> Path:
    """The checkpoint whose weights a finished run ends with: its best one with --load_best_model_at_end, else the
    last. (The best one is recorded by name: the run folder may have moved since.)"""
    best = json.loads((checkpoint / TRAINER_STATE).read_text()).get("best_model_checkpoint")
    if load_best and best and (checkpoint.parent / Path(best).name).is_dir():
        return checkpoint.parent / Path(best).name
    return checkpoint


def recorded_identity(checkpoint: Path) -> dict:
    return json.loads((checkpoint / MARKER).read_text())["identity"]


def differences(theirs: dict, ours: dict) -> list[str]:
    keys = sorted(set(theirs) | set(ours))
    return [f"--{k}: {theirs.get(k, '(not recorded)')!r} there, {ours.get(k, '(not a flag now)')!r} now"
            for k in keys if theirs.get(k) != ours.get(k)]


@dataclass
class ResumePlan:
    folder: Path
    checkpoint: Path | None = None                        # resume from here; None: start from the pretrained model
    skipped: list[str] = field(default_factory=list)      # broken checkpoints passed over (warned at start)
    wipe: list[Path] = field(default_factory=list)        # --overwrite_output_dir: removed before training


def _ways_out() -> str:
    return ("Pass --overwrite_output_dir to delete its checkpoints and start over, or --output_dir with another "
            "folder (without --output_dir every configuration gets its own folder under result/output/).")


def _lines(heading: str, details: list[str], way_out: str) -> str:
    """One problem: what is wrong, its details indented below, the way out."""
    return "\n".join([heading, *(f"  {d}" for d in details), way_out])


def plan_resume(folder: Path, identity: dict, *, overwrite: bool, explicit: str | None) -> ResumePlan:
    """Which checkpoint this run resumes from, decided before anything loads. UsageError: the folder belongs to
    another run, or holds only checkpoints that cannot be used."""
    plan = ResumePlan(folder)
    found = checkpoints(folder)
    if explicit is not None:
        checkpoint = Path(explicit)
        problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else f"{checkpoint} is not a folder"
        if problem:
            raise UsageError([f"--resume_from_checkpoint {explicit}: {problem}. Point it at a complete checkpoint-N "
                              f"folder."])
        diff = differences(recorded_identity(checkpoint), identity)
        if diff:
            raise UsageError([_lines(f"--resume_from_checkpoint {explicit} was written by another configuration:",
                                     diff, "Resume it with the flags it was made with.")])
        plan.checkpoint = checkpoint
        return plan
    if overwrite:
        plan.wipe = [p for _, p in found] + ([folder / RUN_CONFIG] if (folder / RUN_CONFIG).is_file() else [])
        return plan
    owner = folder / RUN_CONFIG
    if owner.is_file():
        try:
            theirs = json.loads(owner.read_text())["identity"]
        except (ValueError, KeyError, TypeError):
            raise UsageError([f"{owner} does not parse, so it is unknown which run owns {folder}. "
                              + _ways_out()]) from None
        diff = differences(theirs, identity)
        if diff:
            raise UsageError([_lines(f"{folder} belongs to another run; its configuration differs in:", diff,
                                     _ways_out())])
    for step, checkpoint in found:
        problem = checkpoint_problem(checkpoint)
        if problem:
            plan.skipped.append(problem)
            continue
        diff = differences(recorded_identity(checkpoint), identity)
        if diff:
            raise UsageError([_lines(f"{checkpoint} was written by another configuration; it differs in:", diff,
                                     _ways_out())])
        plan.checkpoint = checkpoint
        return plan
    if found:
        raise UsageError([_lines(f"{folder} holds checkpoints, and none can be resumed from:", plan.skipped,
                                 _ways_out())])
    return plan


def apply_wipe(plan: ResumePlan) -> None:
    for path in plan.wipe:
        logger.warning("--overwrite_output_dir: removing %s", path)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _write_json(path: Path, payload: dict) -> None:
    """Atomically (temporary file, then rename), readable as the umask allows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=4, default=str)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def current_umask() -> int:
    """The process's umask (os can only read it by setting it)."""
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def weights_follow_umask(folder: Path) -> None:
    """Give the weight files in `folder` (a checkpoint, or where --save_model saved) the permissions the umask allows,
    as every other file a run writes. safetensors (0.8) writes each file into a temporary file created with mode 0600
    and renames it into place (safetensors issue #782), so weights were readable by their owner alone."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).glob("*.safetensors"):
        if path.is_file() and path.stat().st_mode & 0o777 != mode:
            os.chmod(path, mode)


class CheckpointCallback(TrainerCallback):
    """Records which run owns the folder when training begins, marks each checkpoint complete once Hugging Face has
    written all of its files, then applies the rotation limit (see the module docstring)."""

    def __init__(self, identity: dict, run_id: str, save_total_limit: int | None):
        self.identity, self.run_id, self.save_total_limit = identity, run_id, save_total_limit

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            _write_json(Path(args.output_dir) / RUN_CONFIG, {"run_id": self.run_id, "identity": self.identity})

    def on_save(self, args, state, control, **kwargs):
        # every rank writes its own RNG state into the checkpoint: the marker waits for all of them
        parallel.barrier()
        if not args.should_save:
            return
        folder = Path(args.output_dir)
        checkpoint = folder / checkpoint_name(state.global_step)
        weights_follow_umask(checkpoint)
        files = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
                 if p.is_file() and p.name != MARKER}
        _write_json(checkpoint / MARKER, {"step": state.global_step, "run_id": self.run_id,
                                          "identity": self.identity, "files": files})
        self.rotate(folder, state.best_model_checkpoint)

    def rotate(self, folder: Path, best: str | None) -> None:
        found = checkpoints(folder)
        complete = [(step, path) for step, path in found if checkpoint_problem(path) is None]
        newest = complete[0][0] if complete else None   # the step of the newest complete checkpoint
        keep = {path for _, path in (complete[:self.save_total_limit] if self.save_total_limit else complete)}
        if best:
            keep.add(Path(best))
        for step, path in found:
            broken = (step, path) not in complete
            # broken ones older than a complete checkpoint are the leftovers of interrupted saves
            if (broken and newest is not None and step < newest) or (not broken and path not in keep):
                shutil.rmtree(path, ignore_errors=True)


# --- results ------------------------------------------------------------------------------------------------------

def write_result(path: Path, payload: dict, run_id: str) -> Path:
    """Write a result file; one of another run (another run_id) at `path` is kept and the result goes beside it."""
    if path.is_file():
        try:
            theirs = json.loads(path.read_text()).get("run_id")
        except (OSError, ValueError, AttributeError):
            theirs = None
        if theirs != run_id:
            beside = path.with_name(f"{path.stem}-{run_id}{path.suffix}")
            logger.warning("%s holds the result of another run (run id %s); writing this run's (%s) to %s instead",
                           path, theirs or "unknown", run_id, beside)
            path = beside
    _write_json(path, payload)
    return path


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def writable_problem(path: Path, what: str, flag: str) -> str | None:
    """Why `path` (a file, or a folder, to be written later) cannot be written. Probed by creating and removing a
    temporary file in the nearest folder that exists (permission bits do not tell: root may write anywhere but in
    /proc); nothing is left behind."""
    path = Path(path)
    if what == "file" and path.is_dir():
        return f"{flag} {path} is a folder; give a file name such as {path / 'result.json'}."
    if what == "folder" and path.exists() and not path.is_dir():
        return f"{flag} {path} is a file; give a folder."
    existing = nearest_existing(path if what == "folder" else path.parent)
    if not existing.is_dir():
        return f"{flag} {path}: {existing} is a file, not a folder; choose another {what}."
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        return f"{flag} {path}: cannot write in {existing} ({error.strerror}); choose a {what} you can write to."
    return None
