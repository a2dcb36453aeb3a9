"""Task entries, data loading and the reference sampling."""

import gzip
import json
import logging

import numpy as np
import pytest

import tasks
import templates
from conftest import shared_data_or_skip


def reference_subset(num_rows, seed, num):
    """MeZO's sampling: numpy permutation under a temporarily seeded global RNG, first `num` indices."""
    state = np.random.get_state()
    np.random.seed(seed)
    order = np.random.permutation(num_rows)[:num]
    np.random.set_state(state)
    return order.tolist()


@pytest.fixture(scope="module")
def sst2():
    return tasks.load_task("SST2", str(shared_data_or_skip()))


def test_sample_subset_matches_reference_and_restores_numpy_state(sst2):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    for seed, num in [(0, 1000), (1, 16), (42, 7)]:
        got = [s.id for s in sst2.sample_subset("train", seed, num)]
        want = [sst2.samples["train"][i].id for i in reference_subset(len(sst2.samples["train"]), seed, num)]
        assert got == want
    assert (np.random.get_state()[1] == before).all()
    assert len(sst2.sample_subset("validation", 0, 10_000)) == 872  # larger than the split: the whole split, shuffled


def test_train_dev_are_head_and_tail_of_one_draw(sst2):
    seeds, sets = sst2.sample_train_sets(16, 8, None, None, seed=3)
    alone = sst2.sample_subset("train", 3, 16)
    assert seeds == [3] and [s.id for s in sets[0][:16]] == [s.id for s in alone]
    seeds, sets = sst2.sample_train_sets(4, None, None, 3, seed=None)
    assert seeds == [0, 1, 2] and all(len(s) == 4 for s in sets)


def test_one_demo_set_per_eval_example_seeds(sst2):
    state = np.random.get_state()
    np.random.seed(0)
    want = np.random.randint(0, 10000, 5).tolist()
    np.random.set_state(state)
    seeds, sets = sst2.sample_train_sets(2, None, 5, None, None)
    assert seeds == want
    assert [[s.id for s in demo] for demo in sets] == [
        [sst2.samples["train"][i].id for i in reference_subset(67349, s, 2)] for s in want]
    with pytest.raises(ValueError, match="--num_dev"):
        sst2.sample_train_sets(2, 3, 5, None, None)


def test_too_small_split_shrinks_train_and_says_so():
    wsc = tasks.load_task("WSC", str(shared_data_or_skip()))
    _, sets = wsc.sample_train_sets(1000, 500, None, None, seed=0)
    assert len(sets[0]) == 554  # the reference's behaviour: dev keeps 500, train shrinks to 54
    clipped = wsc.clipped(1000, 500, 100_000)
    assert clipped["num_train"]["used"] == 54 and "dev keeps its 500" in clipped["num_train"]["why"]
    assert clipped["num_eval"] == {"requested": 100_000, "used": 104,
                                   "why": "WSC has 104 validation rows; all are evaluated"}
    assert wsc.clipped(16, 8, 50) == {}
    # one demo set per eval example: one seed per example actually evaluated, as the reference
    seeds, sets = wsc.sample_train_sets(2, None, 100_000, None, None)
    assert len(seeds) == len(sets) == 104


def test_every_task_loads_and_renders_from_the_bundled_sample():
    for name, spec in tasks.TASKS.items():
        task = tasks.load_task(name, str(tasks.BUNDLED_DATA_DIR))
        template = spec.template()
        sample = task.samples["validation"][0]
        assert template.encode(sample)
        if spec.generation:
            assert sample.candidates is None and isinstance(sample.correct_candidate, list)
            assert template.verbalize(sample, sample.correct_candidate).endswith("\n")
        else:
            assert all(template.verbalize(sample, c) for c in sample.candidates)
            gold = sample.correct_candidate
            assert all(g in sample.candidates for g in gold) if isinstance(gold, list) else gold in sample.candidates


def test_real_rows_become_the_reference_samples():
    data = shared_data_or_skip()
    copa = tasks.load_task("Copa", str(data)).samples["train"][0]
    assert copa.candidates == ["The sun was rising.", "The grass was cut."] and copa.correct_candidate == "The sun was rising."
    boolq = tasks.load_task("BoolQ", str(data)).samples["train"][0]
    assert boolq.candidates == ["Yes", "No"] and boolq.correct_candidate == "Yes" and boolq.id is None
    squad = tasks.load_task("SQuAD", str(data)).samples["validation"][0]
    assert set(squad.data) == {"title", "context", "question", "answers"} and squad.id == 0
    assert squad.correct_candidate == squad.data["answers"]
    drop = tasks.load_task("DROP", str(data)).samples["train"][0]
    assert set(drop.data) == {"context", "question", "answers"}


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="Valid task names: SST2, RTE"):
        tasks.get_task_spec("Foo")
    with pytest.raises(ValueError, match="Did you mean 'Copa'"):
        tasks.get_task_spec("COPA")


def test_data_dir_without_the_task_files(tmp_path):
    (tmp_path / "sst2").mkdir()
    with pytest.raises(tasks.DataError, match=r"no train\.jsonl or train\.jsonl\.gz in .*sst2"):
        tasks.load_task("SST2", str(tmp_path))
    with pytest.raises(tasks.DataError, match="is not a directory"):
        tasks.load_task("SST2", str(tmp_path / "missing"))


def test_malformed_rows_name_file_line_and_field(tmp_path):
    (tmp_path / "rte").mkdir()
    good = {"premise": "p", "hypothesis": "h", "label": 0, "idx": 0}
    with gzip.open(tmp_path / "rte" / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps(good) + "\n" + json.dumps({"premise": "p", "label": 1}) + "\n")
    (tmp_path / "rte" / "validation.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(tasks.DataError, match=r"train\.jsonl\.gz:2: row lacks field\(s\) hypothesis"):
        tasks.load_task("RTE", str(tmp_path))
    with gzip.open(tmp_path / "rte" / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps(good) + "\n{not json\n")
    with pytest.raises(tasks.DataError, match=r"train\.jsonl\.gz:2: not valid JSON"):
        tasks.load_task("RTE", str(tmp_path))


@pytest.mark.parametrize("row,message", [
    ({"premise": 5, "hypothesis": "h", "label": 0}, r"train\.jsonl:2: premise should be str, got int"),
    ({"premise": "p", "hypothesis": "h", "label": "0"}, r"train\.jsonl:2: label should be int, got str"),
    ({"premise": "p", "hypothesis": "h", "label": True}, r"label should be int, got bool"),
    ({"premise": "p", "hypothesis": "h", "label": -1}, r"row 1: label -1 is not one of 0\.\.1 \(a -1 marks an unlabelled"),
    ({"premise": "p", "hypothesis": "h", "label": 2}, r"label 2 is not one of 0\.\.1"),
])
def test_rows_of_the_wrong_type_name_file_line_and_field(tmp_path, row, message):
    (tmp_path / "rte").mkdir()
    good = {"premise": "p", "hypothesis": "h", "label": 0}
    (tmp_path / "rte" / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    (tmp_path / "rte" / "validation.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(tasks.DataError, match=message):
        tasks.load_task("RTE", str(tmp_path))


def test_nested_fields_invalid_utf8_and_empty_splits_are_refused(tmp_path):
    (tmp_path / "squad").mkdir()
    good = {"title": "t", "context": "c", "question": "q", "answers": {"text": ["a"], "answer_start": [0]}}
    bad = dict(good, answers={"text": "a"})
    (tmp_path / "squad" / "train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    (tmp_path / "squad" / "validation.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(tasks.DataError, match=r"train\.jsonl:2: answers\.text should be a list, got str"):
        tasks.load_task("SQuAD", str(tmp_path))
    (tmp_path / "squad" / "train.jsonl").write_bytes(json.dumps(good).encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(tasks.DataError, match=r"train\.jsonl:2: not valid UTF-8"):
        tasks.load_task("SQuAD", str(tmp_path))
    (tmp_path / "squad" / "train.jsonl").write_text(json.dumps(good) + "\n")
    (tmp_path / "squad" / "validation.jsonl").write_text("\n")
    with pytest.raises(tasks.DataError, match=r"validation\.jsonl holds no rows"):
        tasks.load_task("SQuAD", str(tmp_path))


def test_the_scripts_read_per_task_defaults_from_the_table():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(tasks.Path(tasks.__file__)), "defaults", "Copa"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.strip() == "TASK_DEV=100; TASK_FO_BATCH_LIMIT="
    out = subprocess.run([sys.executable, str(tasks.Path(tasks.__file__)), "defaults", "copa"], capture_output=True,
                         text=True)
    assert out.returncode != 0 and "Did you mean 'Copa'" in out.stderr


def test_hub_failure_falls_back_to_bundled_sample_loudly(monkeypatch, caplog):
    def offline(spec, hub_dataset=None):
        raise ConnectionError("no network")

    monkeypatch.delenv(tasks.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(tasks, "load_hub_rows", offline)
    with caplog.at_level(logging.WARNING):
        task = tasks.load_task("CB")
    assert task.source.startswith("bundled:") and len(task.samples["validation"]) == 56
    assert "BUNDLED" in caplog.text and "NOT comparable" in caplog.text


def test_task_templates_are_the_reference_defaults():
    assert tasks.TASKS["BoolQ"].template is templates.BoolQTemplateV3
    assert tasks.TASKS["ReCoRD"].template is templates.ReCoRDTemplateGPT3
    assert tasks.TASKS["SQuAD"].template is templates.SQuADv2Template
    assert {n for n, s in tasks.TASKS.items() if s.generation} == {"SQuAD", "DROP"}
    assert {n for n, s in tasks.TASKS.items() if s.metric == "f1"} == {"SQuAD", "DROP"}
