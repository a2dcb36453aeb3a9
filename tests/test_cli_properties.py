"""Property test of run.py's boundary: for random combinations of flags (valid and invalid) and malformed data rows,
every case is either a normal run that writes a complete result file or a clean error with exit status 2 that
writes nothing; never a traceback, never a partial file."""

import gzip
import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import run
from conftest import shared_data_or_skip

CASES = 200  # examples hypothesis draws (the README quotes this number)

# flag -> (valid values, invalid values); a switch has no values
FLAGS = {
    "--num_train": (["0", "1", "2"], ["-1", "abc"]), "--num_eval": (["1", "3", "100000"], ["0", "x"]),
    "--num_dev": (["1", "2", "500"], ["0"]), "--train_set_seed": (["0", "3"], ["-1"]),
    "--num_train_sets": (["1", "2"], ["0"]), "--learning_rate": (["1e-3", "0"], ["-1e-3", "nan", "inf"]),
    "--max_steps": (["1", "2", "-1"], ["0", "-5"]), "--per_device_train_batch_size": (["1", "2"], ["0"]),
    "--per_device_eval_batch_size": (["1", "4"], ["0"]), "--zo_eps": (["1e-3", "1e-1"], ["0", "-1e-2"]),
    "--zo_optim": (["mezo", "zo_adamu"], ["ZO_AdaMU", "adam"]),
    "--zo_direction": (["gaussian", "rademacher"], ["uniform"]), "--zo_t1": (["0", "1"], ["-2"]),
    "--max_length": (["8", "64", "512"], ["1", "-3"]), "--max_new_tokens": (["1", "3"], ["0"]),
    "--task_name": (["SST2", "RTE", "SQuAD"], ["sst2", "Foo"]), "--seed": (["0", "7"], ["-1"]),
    "--result_file": (["out.json"], ["/proc/nope/x.json", "."]), "--output_dir": (["runs/a"], ["/proc/nope"]),
    "--model_name": ([], ["./nope", "not a repo id"]), "--num_beams": (["1", "2"], ["0"]),
    "--train_as_classification": (["true", "false"], ["maybe"]), "--foo": ([], ["1"]), "--lr": ([], ["1e-3"]), "--lerning_rate": ([], ["1e-3"]),
    "--lora": None, "--prefix_tuning": None, "--head_tuning": None, "--linear_probing": None, "--sfc": None,
    "--non_diff": None, "--no_final_eval": None, "--no_only_train_option": None, "--zo_keep_direction": None,
    "--zo_carry_perturbation": None, "--load_bfloat16": None, "--verbose": None,
}
CORRUPTIONS = ["missing field", "wrong type", "null", "empty string", "huge string", "invalid utf-8", "not an object",
               "garbage line", "label out of range"]


def flag_strategy():
    """Mostly valid values (so that many cases run), some invalid ones."""
    def pick(flag):
        if FLAGS[flag] is None:
            return st.just([flag])
        valid, invalid = FLAGS[flag]
        values = st.sampled_from(valid) if valid else st.nothing()
        if invalid:
            values = st.one_of(values, st.sampled_from(invalid)) if valid else st.sampled_from(invalid)
        return values.map(lambda v: [flag, v])
    return st.sampled_from(sorted(FLAGS)).flatmap(pick)


case = st.fixed_dictionaries({
    "trainer": st.sampled_from(["none", "regular", "zo"]),
    "flags": st.lists(flag_strategy(), max_size=4),
    "corruption": st.none() | st.tuples(st.sampled_from(["sst2", "rte", "squad"]),
                                        st.sampled_from(["train", "validation"]),
                                        st.sampled_from(CORRUPTIONS), st.integers(0, 7)),
})


def corrupt(line: str, kind: str) -> bytes:
    row = json.loads(line)
    field = next(k for k in row if k not in ("idx", "label", "answers", "id"))
    if kind == "missing field":
        del row[field]
    elif kind == "wrong type":
        row[field] = 17
    elif kind == "null":
        row[field] = None
    elif kind == "empty string":
        row[field] = ""
    elif kind == "huge string":
        row[field] = "word " * 20_000
    elif kind == "label out of range":
        row["label"] = 7
    elif kind == "invalid utf-8":
        return json.dumps(row).encode()[:-2] + b"\xff\xfe\"}\n"
    elif kind == "not an object":
        return b"[1, 2, 3]\n"
    elif kind == "garbage line":
        return b"{\"premise\": \n"
    return (json.dumps(row) + "\n").encode()


@pytest.fixture(scope="module")
def clean_rows():
    source = shared_data_or_skip()
    rows = {}
    for task in ("sst2", "rte", "squad"):
        for split in ("train", "validation"):
            path = next(p for p in (source / task).iterdir() if p.name.startswith(split + "."))
            with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
                rows[task, split] = [line for _, line in zip(range(12), f)]
    return rows


def write_data(folder: Path, rows: dict, corruption) -> None:
    for (task, split), lines in rows.items():
        (folder / task).mkdir(parents=True, exist_ok=True)
        encoded = [line.encode() for line in lines]
        if corruption and (task, split) == corruption[:2]:
            index = corruption[3] % len(lines)
            encoded[index] = corrupt(lines[index], corruption[2])
        (folder / task / f"{split}.jsonl").write_bytes(b"".join(encoded))


def test_every_command_line_is_a_run_or_a_clean_error(tmp_path, monkeypatch, tiny_llama_dir, clean_rows, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    logging.getLogger().setLevel(logging.WARNING)  # the runs' INFO lines would flood the captured log
    outcomes = {0: 0, 2: 0}

    @settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(case)
    def check(example):
        cwd = tmp_path / f"case{sum(outcomes.values())}"
        cwd.mkdir()
        write_data(cwd / "data", clean_rows, example["corruption"])
        argv = ["--model_name", str(tiny_llama_dir), "--data_dir", str(cwd / "data"), "--trainer", example["trainer"],
                "--train_set_seed", "0", "--num_train", "4", "--num_eval", "2", "--report_to", "none",
                "--disable_tqdm", "true", "--max_new_tokens", "2"]
        if example["trainer"] != "none":
            argv += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no"]
        for flag in example["flags"]:
            argv += flag
        monkeypatch.chdir(cwd)
        status = run.main(argv)  # any exception fails the test: a traceback is never an answer
        assert status in (0, 2), (status, argv)
        outcomes[status] += 1
        written = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*") if p.is_file() and "data" not in p.parts)
        assert not [p for p in written if Path(p).name.startswith(".tmp-")], written  # no half-written file
        if status == 2:
            assert written == [], (argv, written)  # a refused run writes nothing
        else:
            for path in [p for p in written if p.endswith(".json")]:
                json.loads((cwd / path).read_text())

    check()
    with capsys.disabled():
        print(f"\n[cli property] {sum(outcomes.values())} cases: {outcomes[0]} runs, {outcomes[2]} clean errors")
    assert sum(outcomes.values()) == CASES and outcomes[0] > 10 and outcomes[2] > 10
