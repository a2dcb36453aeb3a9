"""Tasks: one declarative entry per task, data loading, and the reference sampling.

A task entry says where its rows come from (a local folder in Hugging Face field layout, the hub, or the small
sample bundled in `data/`), how a row becomes a `Sample`, which template renders it, and which metric scores it.
Sampling reproduces MeZO exactly (numpy `permutation` under a temporary seed) so results compare with the papers.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import templates

logger = logging.getLogger(__name__)

BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "data"
DATA_DIR_ENV = "ZO_DATA_DIR"
SPLITS = ("train", "validation")


class DataError(ValueError):
    """Bad or missing task data; the message names the file, the value and the fix."""


@dataclass
class Sample:
    id: Any
    data: dict
    candidates: list | None
    correct_candidate: Any


# --- row -> Sample converters --------------------------------------------------------------------------------------

def _labelled(num_labels: int) -> Callable[[dict, int], Sample]:
    def convert(row: dict, index: int) -> Sample:
        if not 0 <= row["label"] < num_labels:
            raise DataError(f"row {index}: label {row['label']} is not one of 0..{num_labels - 1} (a -1 marks an "
                            f"unlabelled test split, which cannot be scored; use the validation split)")
        return Sample(id=row.get("idx"), data=row, candidates=list(range(num_labels)), correct_candidate=row["label"])
    return convert


def _copa(row: dict, index: int) -> Sample:
    if row["label"] not in (0, 1):
        raise DataError(f"row {index}: label {row['label']} is not 0 or 1")
    choices = [row["choice1"], row["choice2"]]
    return Sample(id=row["idx"], data=row, candidates=choices, correct_candidate=choices[row["label"]])


def _boolq(row: dict, index: int) -> Sample:
    return Sample(id=None, data=row, candidates=["Yes", "No"], correct_candidate="Yes" if row["answer"] else "No")


def _record(row: dict, index: int) -> Sample:
    if not row["entities"]:
        raise DataError(f"row {index} (idx {row.get('idx')!r}) has no candidate entities")
    return Sample(id=row.get("idx"), data=row, candidates=list(row["entities"]), correct_candidate=list(row["answers"]))


def _squad(row: dict, index: int) -> Sample:
    answers = list(row["answers"]["text"])
    if not answers:
        raise DataError(f"SQuAD row {index} (id {row.get('id')!r}) has no answer; every SQuAD v1.1 row should have one")
    data = {"title": row["title"], "context": row["context"], "question": row["question"], "answers": answers}
    return Sample(id=index, data=data, candidates=None, correct_candidate=answers)


def _drop(row: dict, index: int) -> Sample:
    answers = list(row["answers_spans"]["spans"])
    if not answers:
        raise DataError(f"DROP row {index} (query_id {row.get('query_id')!r}) has no answer span")
    data = {"context": row["passage"], "question": row["question"], "answers": answers}
    return Sample(id=index, data=data, candidates=None, correct_candidate=answers)


# --- the task table ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    """One task. `fields` declares the type of every field a row must have (str, int, bool, list[str], or a dict of
    sub-fields); rows are checked against it when they are read, so a malformed file is reported by line."""
    name: str
    local_dir: str                  # folder under --data_dir / ZO_DATA_DIR / data/
    hub_path: str                   # parquet-backed hub repository (datasets >= 4 refuses loading scripts)
    hub_config: str | None
    fields: dict                    # field name -> type of its value
    to_sample: Callable[[dict, int], Sample]
    template: type
    metric: str = "accuracy"
    generation: bool = False
    train_sep: str = "\n\n"         # separator between ICL demonstrations
    # the training objective by default (MeZO's scripts turn classification off for these)
    train_as_classification: bool = True
    dev_size: int = 500             # the scripts' dev set (MeZO: 500, or 100 for the small CB and Copa)
    fo_batch_limit: int | None = None   # first-order fine-tuning: largest per-device batch MeZO's scripts use
    hub_splits: dict = field(default_factory=lambda: {"train": "train", "validation": "validation"})


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec(name="SST2", local_dir="sst2", hub_path="nyu-mll/glue", hub_config="sst2",
             fields={"sentence": str, "label": int}, to_sample=_labelled(2), template=templates.SST2Template),
    TaskSpec(name="RTE", local_dir="rte", hub_path="aps/super_glue", hub_config="rte",
             fields={"premise": str, "hypothesis": str, "label": int}, to_sample=_labelled(2),
             template=templates.RTETemplate),
    TaskSpec(name="CB", local_dir="cb", hub_path="aps/super_glue", hub_config="cb",
             fields={"premise": str, "hypothesis": str, "label": int}, to_sample=_labelled(3),
             template=templates.CBTemplate, dev_size=100),
    TaskSpec(name="BoolQ", local_dir="boolq", hub_path="google/boolq", hub_config=None,
             fields={"question": str, "passage": str, "answer": bool}, to_sample=_boolq,
             template=templates.BoolQTemplateV3),
    TaskSpec(name="WSC", local_dir="wsc.fixed", hub_path="aps/super_glue", hub_config="wsc.fixed",
             fields={"text": str, "span1_text": str, "span2_text": str, "label": int}, to_sample=_labelled(2),
             template=templates.WSCTemplate),
    TaskSpec(name="WIC", local_dir="wic", hub_path="aps/super_glue", hub_config="wic",
             fields={"word": str, "sentence1": str, "sentence2": str, "label": int}, to_sample=_labelled(2),
             template=templates.WICTemplate),
    TaskSpec(name="MultiRC", local_dir="multirc", hub_path="aps/super_glue", hub_config="multirc",
             fields={"paragraph": str, "question": str, "answer": str, "label": int}, to_sample=_labelled(2),
             template=templates.MultiRCTemplate, fo_batch_limit=2),
    TaskSpec(name="Copa", local_dir="copa", hub_path="aps/super_glue", hub_config="copa",
             fields={"premise": str, "choice1": str, "choice2": str, "question": str, "label": int},
             to_sample=_copa, template=templates.CopaTemplate, train_as_classification=False, dev_size=100),
    TaskSpec(name="ReCoRD", local_dir="record", hub_path="aps/super_glue", hub_config="record",
             fields={"passage": str, "query": str, "entities": list[str], "answers": list[str]}, to_sample=_record,
             template=templates.ReCoRDTemplateGPT3, train_as_classification=False, fo_batch_limit=2),
    TaskSpec(name="SQuAD", local_dir="squad", hub_path="rajpurkar/squad", hub_config="plain_text",
             fields={"title": str, "context": str, "question": str, "answers": {"text": list[str]}},
             to_sample=_squad, template=templates.SQuADv2Template, metric="f1", generation=True,
             train_as_classification=False),
    TaskSpec(name="DROP", local_dir="drop", hub_path="ucinlp/drop", hub_config=None,
             fields={"passage": str, "question": str, "answers_spans": {"spans": list[str]}}, to_sample=_drop,
             template=templates.DROPTemplate, metric="f1", generation=True, train_as_classification=False,
             fo_batch_limit=1),
]}


def unknown_task(name: str) -> ValueError:
    hint = next((f" Did you mean {valid!r}? (names are case-sensitive)" for valid in TASKS
                 if valid.lower() == name.lower()), "")
    return ValueError(f"Unknown task {name!r}.{hint} Valid task names: {', '.join(TASKS)}.")


def get_task_spec(name: str) -> TaskSpec:
    if name in TASKS:
        return TASKS[name]
    raise unknown_task(name)


# --- reading rows --------------------------------------------------------------------------------------------------

def split_file(directory: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".jsonl.gz"):
        path = directory / f"{split}{suffix}"
        if path.is_file():
            return path
    return None


def type_problem(value, expected, where: str) -> str | None:
    """Why `value` does not have the declared type (str, int, bool, list[X], or a dict of sub-fields), or None."""
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            return f"{where} should be an object with {', '.join(expected)}, got {type(value).__name__}"
        for key, sub in expected.items():
            if key not in value:
                return f"{where} lacks {key!r}"
            problem = type_problem(value[key], sub, f"{where}.{key}")
            if problem:
                return problem
        return None
    if typing.get_origin(expected) is list:
        if not isinstance(value, list):
            return f"{where} should be a list, got {type(value).__name__}"
        item = typing.get_args(expected)[0]
        return next((p for i, v in enumerate(value) if (p := type_problem(v, item, f"{where}[{i}]"))), None)
    # bool is an int subclass in Python: a label of true is not a label of 1
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        return f"{where} should be {expected.__name__}, got {type(value).__name__} {str(value)[:40]!r}"
    return None


def read_jsonl(path: Path, required_fields: dict) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid UTF-8 (byte {error.start}). Re-encode the file as "
                                f"UTF-8 or remove that line.") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line_number}: not valid JSON ({error.msg}). Fix or remove that line.") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object per line, got {type(row).__name__}.")
            missing = [name for name in required_fields if name not in row]
            if missing:
                raise DataError(f"{path}:{line_number}: row lacks field(s) {', '.join(missing)} "
                                f"(rows need {', '.join(required_fields)}, in Hugging Face field layout).")
            for name, expected in required_fields.items():
                problem = type_problem(row[name], expected, name)
                if problem:
                    raise DataError(f"{path}:{line_number}: {problem} (Hugging Face field layout).")
            rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no rows; every split needs at least one.")
    return rows


def load_local_rows(spec: TaskSpec, data_dir: Path) -> dict[str, list[dict]]:
    directory = data_dir / spec.local_dir
    rows = {}
    for split in SPLITS:
        path = split_file(directory, split)
        if path is None:
            raise DataError(f"Task {spec.name}: no {split}.jsonl or {split}.jsonl.gz in {directory}. "
                            f"Point --data_dir (or ${DATA_DIR_ENV}) at a folder holding {spec.local_dir}/{split}.jsonl[.gz], "
                            f"or leave both unset to load from the Hugging Face hub.")
        rows[split] = read_jsonl(path, spec.fields)
    return rows


def load_hub_rows(spec: TaskSpec, hub_dataset: str | None = None) -> dict[str, list[dict]]:
    """Rows from the hub. `hub_dataset` ("path" or "path:config") overrides the task's default repository."""
    import datasets  # imported lazily: the local paths do not need it

    path, config = spec.hub_path, spec.hub_config
    if hub_dataset:
        path, _, config = hub_dataset.partition(":")
        config = config or None
    rows = {}
    for split in SPLITS:
        table = datasets.load_dataset(path, config, split=spec.hub_splits[split])
        rows[split] = [dict(row) for row in table]
        if not rows[split]:
            raise DataError(f"Hub dataset {path}:{config} has no {split} rows.")
        missing = [name for name in spec.fields if name not in rows[split][0]]
        if missing:
            raise DataError(f"Hub dataset {path}:{config} ({split}) lacks field(s) {', '.join(missing)} needed by "
                            f"task {spec.name}; pass --hub_dataset with a repository in the original field layout.")
        for index, row in enumerate(rows[split]):
            problem = next((p for name, expected in spec.fields.items()
                            if (p := type_problem(row.get(name), expected, name))), None)
            if problem:
                raise DataError(f"Hub dataset {path}:{config} ({split}) row {index}: {problem}; pass --hub_dataset "
                                f"with a repository in the original field layout.")
    return rows


@dataclass
class TaskData:
    spec: TaskSpec
    samples: dict[str, list[Sample]]   # "train" and "validation"
    source: str                        # where the rows came from, recorded in results
    warning: str | None = None         # why the rows are not what was asked for (the bundled sample), if so

    @property
    def name(self) -> str:
        return self.spec.name

    # --- sampling, exactly as the reference does it ----------------------------------------------------------------

    def sample_subset(self, split: str, seed: int, num: int | None) -> list[Sample]:
        rows = self.samples[split]
        if num is None:
            return list(rows)
        with temp_seed(seed):
            order = np.random.permutation(len(rows))[:num]
        return [rows[i] for i in order]

    def sample_train_sets(self, num_train: int, num_dev: int | None, num_eval: int | None,
                          num_train_sets: int | None, seed: int | None) -> tuple[list[int], list[list[Sample]]]:
        """Seeds and train(+dev) sets. Without a seed or a number of sets, one demo set per eval example."""
        if seed is not None:
            seeds = [seed]
        elif num_train_sets is not None:
            seeds = list(range(num_train_sets))
        else:
            if num_dev is not None:
                raise ValueError("One-demo-set-per-eval-example mode cannot take --num_dev; "
                                 "pass --train_set_seed or --num_train_sets to carve a dev set.")
            # one seed per eval example actually drawn, as the reference (len(eval_samples))
            length = len(self.sample_subset("validation", 0, num_eval))
            with temp_seed(0):
                seeds = np.random.randint(0, 10000, length).tolist()
        wanted = num_train + (num_dev or 0)
        return seeds, [self.sample_subset("train", s, wanted) for s in seeds]

    def clipped(self, num_train: int, num_dev: int | None, num_eval: int | None) -> dict[str, dict]:
        """Sizes asked for that the data cannot give, as {flag: {"requested", "used", "why"}} (empty if none)."""
        out = {}
        rows = {split: len(self.samples[split]) for split in SPLITS}
        if num_eval is not None and num_eval > rows["validation"]:
            out["num_eval"] = {"requested": num_eval, "used": rows["validation"],
                               "why": f"{self.name} has {rows['validation']} validation rows; all are evaluated"}
        if num_train + (num_dev or 0) > rows["train"]:
            if num_dev is None:
                out["num_train"] = {"requested": num_train, "used": rows["train"],
                                    "why": f"{self.name} has {rows['train']} training rows"}
            else:  # as in the reference, dev keeps its rows and train shrinks
                out["num_train"] = {"requested": num_train, "used": max(rows["train"] - num_dev, 0),
                                    "why": f"num_train + num_dev = {num_train + num_dev} exceeds the {rows['train']} "
                                           f"training rows of {self.name}; dev keeps its {num_dev}"}
        return out


@contextlib.contextmanager
def temp_seed(seed: int):
    """Seed numpy's global RNG for a block and restore its previous state afterwards (the reference's sampling)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def resolve_data_dir(data_dir: str | None) -> Path | None:
    chosen = data_dir or os.environ.get(DATA_DIR_ENV)
    if not chosen:
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        origin = "--data_dir" if data_dir else f"${DATA_DIR_ENV}"
        raise DataError(f"{origin} {chosen!r} is not a directory. Pass a folder holding <task>/<split>.jsonl[.gz] "
                        f"or unset it to use the hub.")
    return path


def load_task(name: str, data_dir: str | None = None, hub_dataset: str | None = None) -> TaskData:
    """Rows from --data_dir/$ZO_DATA_DIR, else the hub, else the bundled sample (with a loud warning)."""
    spec = get_task_spec(name)
    local = resolve_data_dir(data_dir)
    if local is not None:
        rows, source = load_local_rows(spec, local), f"local:{local / spec.local_dir}"
    else:
        try:
            rows = load_hub_rows(spec, hub_dataset)
            source = f"hub:{hub_dataset or spec.hub_path + (':' + spec.hub_config if spec.hub_config else '')}"
        except DataError:
            raise
        except Exception as error:  # offline, gated, renamed: fall back to what ships with the code
            if split_file(BUNDLED_DATA_DIR / spec.local_dir, "train") is None:
                raise DataError(f"Task {spec.name}: the hub failed ({type(error).__name__}: {error}) and no bundled "
                                f"sample exists. Pass --data_dir with a local copy.") from error
            warning = (f"{spec.name}: the Hugging Face hub is unreachable ({type(error).__name__}: "
                       f"{str(error)[:200]}). Using the SMALL BUNDLED SAMPLE in {BUNDLED_DATA_DIR / spec.local_dir}; "
                       f"numbers are NOT comparable with the papers. Pass --data_dir for full data.")
            logger.warning("!!! %s", warning)
            rows, source = load_local_rows(spec, BUNDLED_DATA_DIR), f"bundled:{BUNDLED_DATA_DIR / spec.local_dir}"
            return _to_task_data(spec, rows, source, "data: the SMALL BUNDLED SAMPLE (the hub was unreachable); numbers "
                                                     "are NOT comparable with the papers; pass --data_dir for full data")
    return _to_task_data(spec, rows, source, None)


def _to_task_data(spec: TaskSpec, rows: dict, source: str, warning: str | None) -> TaskData:
    samples = {}
    for split in SPLITS:
        samples[split] = []
        for index, row in enumerate(rows[split]):
            try:
                samples[split].append(spec.to_sample(row, index))
            except DataError as error:
                raise DataError(f"{source} ({split}): {error}. Fix or remove that row.") from None
    return TaskData(spec, samples, source, warning)


if __name__ == "__main__":
    # The bash wrappers read per-task defaults from the table: eval "$(python tasks.py defaults SST2)"
    import sys
    if len(sys.argv) != 3 or sys.argv[1] != "defaults":
        sys.exit("usage: python tasks.py defaults TASK")
    try:
        spec = get_task_spec(sys.argv[2])
    except ValueError as error:
        sys.exit(str(error))
    print(f"TASK_DEV={spec.dev_size}; TASK_FO_BATCH_LIMIT={spec.fo_batch_limit or ''}")
