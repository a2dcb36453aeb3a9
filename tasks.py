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
        return Sample(id=row.get("idx"), data=row, candidates=list(range(num_labels)), correct_candidate=row["label"])
    return convert


def _copa(row: dict, index: int) -> Sample:
    choices = [row["choice1"], row["choice2"]]
    return Sample(id=row["idx"], data=row, candidates=choices, correct_candidate=choices[row["label"]])


def _boolq(row: dict, index: int) -> Sample:
    return Sample(id=None, data=row, candidates=["Yes", "No"], correct_candidate="Yes" if row["answer"] else "No")


def _record(row: dict, index: int) -> Sample:
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
    name: str
    local_dir: str                  # folder under --data_dir / ZO_DATA_DIR / data/
    hub_path: str                   # parquet-backed hub repository (datasets >= 4 refuses loading scripts)
    hub_config: str | None
    fields: tuple[str, ...]         # fields every row must have
    to_sample: Callable[[dict, int], Sample]
    template: type
    metric: str = "accuracy"
    generation: bool = False
    train_sep: str = "\n\n"         # separator between ICL demonstrations
    # objective the training scripts use by default (MeZO's scripts turn classification off for these)
    train_as_classification: bool = True
    hub_splits: dict = field(default_factory=lambda: {"train": "train", "validation": "validation"})


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in [
    TaskSpec("SST2", "sst2", "nyu-mll/glue", "sst2", ("sentence", "label"), _labelled(2), templates.SST2Template),
    TaskSpec("RTE", "rte", "aps/super_glue", "rte", ("premise", "hypothesis", "label"), _labelled(2),
             templates.RTETemplate),
    TaskSpec("CB", "cb", "aps/super_glue", "cb", ("premise", "hypothesis", "label"), _labelled(3),
             templates.CBTemplate),
    TaskSpec("BoolQ", "boolq", "google/boolq", None, ("question", "passage", "answer"), _boolq,
             templates.BoolQTemplateV3),
    TaskSpec("WSC", "wsc.fixed", "aps/super_glue", "wsc.fixed", ("text", "span1_text", "span2_text", "label"),
             _labelled(2), templates.WSCTemplate),
    TaskSpec("WIC", "wic", "aps/super_glue", "wic", ("word", "sentence1", "sentence2", "label"), _labelled(2),
             templates.WICTemplate),
    TaskSpec("MultiRC", "multirc", "aps/super_glue", "multirc", ("paragraph", "question", "answer", "label"),
             _labelled(2), templates.MultiRCTemplate),
    TaskSpec("Copa", "copa", "aps/super_glue", "copa", ("premise", "choice1", "choice2", "question", "label"), _copa,
             templates.CopaTemplate, train_as_classification=False),
    TaskSpec("ReCoRD", "record", "aps/super_glue", "record", ("passage", "query", "entities", "answers"), _record,
             templates.ReCoRDTemplateGPT3, train_as_classification=False),
    TaskSpec("SQuAD", "squad", "rajpurkar/squad", "plain_text", ("title", "context", "question", "answers"), _squad,
             templates.SQuADv2Template, metric="f1", generation=True, train_as_classification=False),
    TaskSpec("DROP", "drop", "ucinlp/drop", None, ("passage", "question", "answers_spans"), _drop,
             templates.DROPTemplate, metric="f1", generation=True, train_as_classification=False),
]}


def get_task_spec(name: str) -> TaskSpec:
    if name in TASKS:
        return TASKS[name]
    hint = next((f" Did you mean {valid!r}? (names are case-sensitive)" for valid in TASKS if valid.lower() == name.lower()), "")
    raise ValueError(f"Unknown task {name!r}.{hint} Valid task names: {', '.join(TASKS)}.")


# --- reading rows --------------------------------------------------------------------------------------------------

def split_file(directory: Path, split: str) -> Path | None:
    for suffix in (".jsonl", ".jsonl.gz"):
        path = directory / f"{split}{suffix}"
        if path.is_file():
            return path
    return None


def read_jsonl(path: Path, required_fields: tuple[str, ...]) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
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
            rows.append(row)
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
        missing = [name for name in spec.fields if rows[split] and name not in rows[split][0]]
        if missing:
            raise DataError(f"Hub dataset {path}:{config} ({split}) lacks field(s) {', '.join(missing)} needed by "
                            f"task {spec.name}; pass --hub_dataset with a repository in the original field layout.")
    return rows


@dataclass
class TaskData:
    spec: TaskSpec
    samples: dict[str, list[Sample]]   # "train" and "validation"
    source: str                        # where the rows came from, recorded in results

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
            length = num_eval if num_eval is not None else len(self.samples["validation"])
            with temp_seed(0):
                seeds = np.random.randint(0, 10000, length).tolist()
        wanted = num_train + (num_dev or 0)
        available = len(self.samples["train"])
        if num_dev is not None and wanted > available:
            logger.warning("!!! %s: num_train + num_dev = %d exceeds the %d training rows. As in the reference, dev "
                           "keeps its %d rows and train SHRINKS to %d. The result file records the actual sizes.",
                           self.name, wanted, available, num_dev, max(available - num_dev, 0))
        return seeds, [self.sample_subset("train", s, wanted) for s in seeds]


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
            logger.warning("!!! %s: the Hugging Face hub is unreachable (%s: %s). Falling back to the SMALL BUNDLED "
                           "SAMPLE in %s; numbers are NOT comparable with the papers. Pass --data_dir for full data.",
                           spec.name, type(error).__name__, str(error)[:200], BUNDLED_DATA_DIR / spec.local_dir)
            rows, source = load_local_rows(spec, BUNDLED_DATA_DIR), f"bundled:{BUNDLED_DATA_DIR / spec.local_dir}"
    samples = {split: [spec.to_sample(row, i) for i, row in enumerate(rows[split])] for split in SPLITS}
    return TaskData(spec, samples, source)
