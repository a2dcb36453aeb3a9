"""report.py on folders of synthetic result files: grouping, selection by the dev metric, mean ± std over seeds,
refusal to select on a test metric, CSV, and plots (written with matplotlib, skipped with a message without it)."""

import csv
import json
import sys

import pytest

import report

BASE = {"task_name": "SST2", "model_name": "/models/smollm2-135m", "trainer": "zo", "zo_optim": "mezo", "lora": True,
        "prefix_tuning": False, "head_tuning": False, "linear_probing": False, "learning_rate": 1e-3, "zo_eps": 1e-2,
        "max_steps": 100, "num_train": 500, "num_dev": 100, "num_eval": 200, "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 1, "seed": 0, "train_set_seed": 0, "tag": "",
        # flags that do not define a run: they must not split configurations
        "output_dir": "x", "logging_steps": 10, "result_file": "y"}


def write_result(folder, name, metrics, run_dir=None, **flags):
    config = BASE | {"seed": flags.get("train_set_seed", 0)} | flags
    payload = dict(metrics) | {"config": config, "run_id": name, "train_set_seed": config["train_set_seed"],
                               "provenance": {"git_commit": "abcdef1234567", "git_dirty": False, "device": "cpu (test)",
                                              "wall_time_s": 10.0}}
    if run_dir is not None:
        payload["run_dir"] = run_dir
    path = folder / f"{name}.json"
    path.write_text(json.dumps(payload))
    return path


@pytest.fixture
def results(tmp_path):
    """SST2 LoRA MeZO: lr 1e-3 wins on dev (75 vs 65) but loses on test (70 vs 90); each has seeds 0 and 1, and
    seed 1 of lr 1e-3 was run with another --output_dir and --tag (still the same configuration). A ZO-AdaMU group with
    a configuration lacking the dev metric, an ICL group with no dev metric at all, and one of several configurations
    none of which has one."""
    folder = tmp_path / "grid"
    folder.mkdir()
    write_result(folder, "a0", {"accuracy": 0.68, "dev_accuracy": 0.74}, learning_rate=1e-3, train_set_seed=0)
    write_result(folder, "a1", {"accuracy": 0.72, "dev_accuracy": 0.76}, learning_rate=1e-3, train_set_seed=1,
                 output_dir="elsewhere", tag="mezo-lora-seed1")
    write_result(folder, "b0", {"accuracy": 0.90, "dev_accuracy": 0.64}, learning_rate=3e-3, train_set_seed=0)
    write_result(folder, "b1", {"accuracy": 0.90, "dev_accuracy": 0.66}, learning_rate=3e-3, train_set_seed=1)
    write_result(folder, "c0", {"accuracy": 0.60, "dev_accuracy": 0.61}, zo_optim="zo_adamu", learning_rate=1e-4)
    write_result(folder, "c1", {"accuracy": 0.99}, zo_optim="zo_adamu", learning_rate=1e-2, num_dev=None)
    nested = folder / "icl"
    nested.mkdir()
    write_result(nested, "d0", {"accuracy": 0.55}, trainer="none", lora=False, num_train=4, num_dev=None)
    write_result(folder, "e0", {"accuracy": 0.5}, task_name="RTE", num_dev=None, learning_rate=1e-3)
    write_result(folder, "e1", {"accuracy": 0.6}, task_name="RTE", num_dev=None, learning_rate=1e-4)
    # files report.py must pass over: a trainer state, a checkpoint's files, a foreign JSON, a broken one
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    (folder / "checkpoint-4").mkdir()
    (folder / "checkpoint-4" / "a.json").write_text(json.dumps({"config": {}, "run_id": "no"}))
    (folder / "notes.json").write_text(json.dumps([1, 2]))
    (folder / "broken.json").write_text("{")
    return folder


def table_rows(text):
    """The first Markdown table's rows by (task, model, mode, optimizer)."""
    rows = {}
    for line in text.split("\n\n")[1].splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[tuple(cells[:4])] = cells
    return rows


def test_table_selects_by_dev_metric_with_mean_and_std_over_seeds(results, capsys):
    assert report.main([str(results)]) == 0
    out, err = capsys.readouterr()
    rows = table_rows(out)
    lora = rows[("SST2", "smollm2-135m", "lora", "mezo")]
    # lr 1e-3: dev 74/76, test 68/72 -> mean 70.0, sample std 2.8; chosen over lr 3e-3 despite its test 90
    assert lora[:11] == ["SST2", "smollm2-135m", "lora", "mezo", "accuracy", "lr=0.001 eps=0.01", "dev_accuracy",
                         "75.0 ± 1.4", "70.0 ± 2.8", "2 (seeds 0, 1)", "2"]
    # no zero-shot result, no training record, no run folder: steps from the flags, forward passes from the method;
    # the chosen LR is the lower end of its grid {1e-3, 3e-3}
    assert lora[11:] == ["–", "100", "200", "–", "–", "–", "edge: lowest LR"]
    adamu = rows[("SST2", "smollm2-135m", "lora", "zo_adamu")]
    assert adamu[5:9] == ["lr=0.0001 eps=0.01 ndev=100", "dev_accuracy", "61.0", "60.0"]  # not the 99 without dev
    icl = rows[("SST2", "smollm2-135m", "icl", "none")]
    assert icl[5:9] == ["ntrain=4", "only configuration (no dev_accuracy)", "–", "55.0"]
    rte = rows[("RTE", "smollm2-135m", "lora", "mezo")]
    assert rte[5] == "–" and "no configuration has dev_accuracy" in rte[6] and rte[8] == "–"
    assert "9 result files, 4 groups" in out
    assert "Code: abcdef1234 (9 runs)" in out
    assert "broken.json" in err  # unreadable JSON is named, not silently dropped


def test_every_configuration_listed_with_all(results, capsys):
    assert report.main([str(results), "--all"]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.split("Every configuration:")[1].splitlines() if line.startswith("| SST2")]
    assert len(listed) == 5
    assert any("lr=0.003 eps=0.01 | 65.0 ± 1.4 | 90.0 ± 0.0 | 2 (seeds 0, 1) |  |" in line for line in listed)
    assert any("lr=0.001 eps=0.01 | 75.0 ± 1.4 | 70.0 ± 2.8 | 2 (seeds 0, 1) | yes |" in line for line in listed)
    assert all(line.count("|") == 17 for line in listed)   # the losers carry the same columns


def test_selecting_on_a_test_metric_is_refused_unless_allowed(results, capsys):
    assert report.main([str(results), "--select", "accuracy"]) == 2
    err = capsys.readouterr().err
    assert "--select accuracy is not a dev metric" in err and "dev_accuracy" in err and "--allow_test_selection" in err
    assert report.main([str(results), "--select", "accuracy", "--allow_test_selection"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows[("SST2", "smollm2-135m", "lora", "mezo")][5:9] == ["lr=0.003 eps=0.01", "accuracy", "90.0 ± 0.0",
                                                                   "90.0 ± 0.0"]


def test_csv_holds_the_selected_numbers(results, tmp_path, capsys):
    path = tmp_path / "out" / "best.csv"
    assert report.main([str(results), "--csv", str(path)]) == 0
    rows = {(r["task"], r["mode"], r["optimizer"]): r for r in csv.DictReader(path.open())}
    lora = rows[("SST2", "lora", "mezo")]
    assert lora["configuration"] == "lr=0.001 eps=0.01" and lora["runs"] == "2" and lora["seeds"] == "0 1"
    assert float(lora["test_mean"]) == pytest.approx(0.70) and float(lora["test_std"]) == pytest.approx(0.028284, 1e-4)
    assert float(lora["select_mean"]) == pytest.approx(0.75) and lora["wall_time_s_mean"] == "10"


def test_no_results_and_missing_folders_are_clear_errors(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "No result files under" in capsys.readouterr().err
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_seeds_and_tag_do_not_split_configurations_but_identity_flags_do(tmp_path):
    write_result(tmp_path, "s0", {"accuracy": 0.5}, train_set_seed=0, seed=42, tag="t0")
    write_result(tmp_path, "s1", {"accuracy": 0.5}, train_set_seed=1, seed=42, tag="t1", logging_steps=1)
    write_result(tmp_path, "m", {"accuracy": 0.5}, max_steps=200)
    runs, _ = report.find_results([tmp_path])
    (group,) = report.group_runs(runs)
    assert sorted(len(c.runs) for c in group.configurations) == [1, 2]
    assert [c.label for c in group.configurations] == ["lr=0.001 eps=0.01 steps=100", "lr=0.001 eps=0.01 steps=200"]
    assert sorted(r.seed for c in group.configurations for r in c.runs) == ["0", "0/42", "1/42"]


def test_a_flag_added_later_splits_configurations_only_away_from_its_default(tmp_path):
    """--zo_probe came after results existed: an older result (no zo_probe) and one at the default are one
    configuration; a forward-probe run is another."""
    write_result(tmp_path, "old", {"accuracy": 0.5})
    write_result(tmp_path, "new", {"accuracy": 0.5}, zo_probe="inplace")
    write_result(tmp_path, "fwd", {"accuracy": 0.5}, zo_probe="forward")
    runs, _ = report.find_results([tmp_path])
    (group,) = report.group_runs(runs)
    assert sorted(sorted(r.path.stem for r in c.runs) for c in group.configurations) == [["fwd"], ["new", "old"]]


def trainer_state(folder, losses, devs):
    folder.mkdir(parents=True)
    history = [{"step": s, "loss": v} for s, v in losses] + [{"step": s, "eval_accuracy": v} for s, v in devs]
    (folder / "trainer_state.json").write_text(json.dumps({"log_history": history, "global_step": 30}))


def test_curves_come_from_the_run_folder_and_a_checkpoint_when_it_has_no_state(tmp_path):
    trainer_state(tmp_path / "output" / "a", [(10, 0.9), (20, 0.7)], [(10, 0.6), (20, 0.7)])
    trainer_state(tmp_path / "output" / "b" / "checkpoint-20", [(10, 1.0)], [(20, 0.5)])
    a, b = (write_result(tmp_path, name, {"accuracy": 0.7}, run_dir=f"output/{name}") for name in "ab")
    a, b = (report.Run(path, json.loads(path.read_text())) for path in (a, b))
    assert report.curves(a, "eval_accuracy") == {"loss": [(10, 0.9), (20, 0.7)], "dev": [(10, 0.6), (20, 0.7)]}
    assert report.curves(b, "eval_accuracy") == {"loss": [(10, 1.0)], "dev": [(20, 0.5)]}
    # a shorter state in the run folder (a rerun that only re-evaluated) does not hide the checkpoint's history
    (tmp_path / "output" / "b" / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    assert report.curves(b, "eval_accuracy") == {"loss": [(10, 1.0)], "dev": [(20, 0.5)]}
    assert report.forwards_per_step(a.config) == 2 and report.forwards_per_step({"trainer": "regular"}) == 1


def plotted_results(results):
    for name, shift in (("a0", 0.0), ("a1", 0.05), ("b0", 0.1)):
        trainer_state(results / "output" / name, [(10, 0.9 - shift), (20, 0.7 - shift), (30, 0.6)],
                      [(10, 0.6 + shift), (30, 0.7 + shift)])
        data = json.loads((results / f"{name}.json").read_text())
        (results / f"{name}.json").write_text(json.dumps(data | {"run_dir": f"output/{name}"}))
    return results


def test_plots_are_written(results, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    assert report.main([str(plotted_results(results)), "--plot", str(plots)]) == 0
    out, err = capsys.readouterr()
    names = sorted(p.name for p in plots.glob("*.png"))
    assert "SST2-smollm2-135m-lora-mezo-curves.png" in names and "best_test.png" in names
    for path in plots.glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert f"wrote {plots / 'best_test.png'}" in out
    assert "b1.json" in err  # a run without a run folder is named, its configuration still drawn from the others


def test_without_matplotlib_the_table_is_printed_and_plots_skipped_with_the_install_command(results, tmp_path,
                                                                                             capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    plots = tmp_path / "plots"
    assert report.main([str(plotted_results(results)), "--plot", str(plots)]) == 1
    out, err = capsys.readouterr()
    assert "| SST2 | smollm2-135m | lora | mezo |" in out
    assert "pip install matplotlib" in err and "No plots were written" in err
    assert not plots.exists() or not list(plots.glob("*.png"))


def test_rows_show_the_gain_over_zero_shot_the_cost_the_dev_curve_and_what_went_wrong(tmp_path, capsys):
    """A zero-shot result (ICL, --num_train 0) in the folders gives every row its gain; the training record gives
    steps, forward passes, seconds per forward and peak memory; a training loss that blew up marks a divergence; a
    group whose every configuration left the test metric at zero-shot is marked as having moved nothing."""
    training = {"global_step": 50, "forward_passes_this_process": 100, "seconds_per_forward": 1.25,
                "peak_rss_mb": 1300.0}
    write_result(tmp_path, "zs", {"accuracy": 0.55}, trainer="none", lora=False, num_train=0, num_dev=None)
    for name, lr, test, losses in (("good", 1e-3, 0.80, [0.9, 0.7, 0.6]), ("wild", 3e-3, 0.50, [0.9, 0.7, 1.2])):
        path = write_result(tmp_path, name, {"accuracy": test, "dev_accuracy": test}, learning_rate=lr,
                            run_dir=f"output/{name}")
        path.write_text(json.dumps(json.loads(path.read_text()) | {"training": training}))
        trainer_state(tmp_path / "output" / name, list(zip((10, 20, 30), losses)), [(25, test - 0.1), (50, test)])
    for name, lr in (("still1", 1e-5), ("still2", 1e-4)):
        write_result(tmp_path, name, {"accuracy": 0.55, "dev_accuracy": 0.5}, zo_optim="lozo", learning_rate=lr)
    assert report.main([str(tmp_path), "--all"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    mezo = rows[("SST2", "smollm2-135m", "lora", "mezo")]
    assert mezo[5] == "lr=0.001 eps=0.01" and mezo[11:] == ["+25.0", "50", "100", "1.25", "1300", "70.0, 80.0",
                                                              "edge: lowest LR"]
    assert "moved nothing" in rows[("SST2", "smollm2-135m", "lora", "lozo")][17]
    wild = next(line for line in out.split("Every configuration:")[1].splitlines() if "lr=0.003" in line)
    assert "| -5.0 |" in wild and "diverged" in wild


def test_ties_on_dev_are_broken_by_the_dev_loss_and_said(tmp_path, capsys):
    for name, lr, dev_loss in (("a", 1e-3, 0.7), ("b", 3e-3, 0.6)):
        write_result(tmp_path, name, {"accuracy": 0.6, "dev_accuracy": 0.6}, learning_rate=lr, run_dir=f"output/{name}")
        (tmp_path / "output" / name).mkdir(parents=True)
        (tmp_path / "output" / name / "trainer_state.json").write_text(json.dumps(
            {"log_history": [{"step": 10, "eval_loss": 0.9}, {"step": 20, "eval_loss": dev_loss}]}))
    assert report.main([str(tmp_path)]) == 0
    row = table_rows(capsys.readouterr().out)[("SST2", "smollm2-135m", "lora", "mezo")]
    assert row[5] == "lr=0.003 eps=0.01" and "tied with lr=0.001 eps=0.01, broken by the lower final dev loss" in row[6]


def test_results_of_different_code_are_refused_or_marked(results, capsys):
    path = results / "b1.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data | {"provenance": data["provenance"] | {"git_commit": "0123456789abc"}}))
    assert report.main([str(results)]) == 2
    err = capsys.readouterr().err
    assert "different code" in err and "0123456789: 1 run (e.g. b1.json)" in err and "--allow_mixed_code" in err
    assert report.main([str(results), "--allow_mixed_code", "--all"]) == 0
    out = capsys.readouterr().out
    assert any("lr=0.003" in line and "code 0123456789/abcdef1234" in line for line in out.splitlines())


def test_plots_say_what_was_not_logged_and_draw_the_zero_shot_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    write_result(tmp_path, "zs", {"accuracy": 0.55}, trainer="none", lora=False, num_train=0, num_dev=None)
    write_result(tmp_path, "a", {"accuracy": 0.7, "dev_accuracy": 0.7}, run_dir="output/a")
    trainer_state(tmp_path / "output" / "a", [], [(10, 0.6), (20, 0.7)])   # dev logged, no training loss
    drawn = []
    plt = report.import_pyplot()
    monkeypatch.setattr(plt.Figure, "savefig", lambda figure, path, **kw: drawn.append((figure, path)))
    assert report.main([str(tmp_path), "--plot", str(tmp_path / "plots")]) == 0
    curves = next(f for f, p in drawn if str(p).endswith("curves.png"))
    texts = [t.get_text() for ax in curves.axes for t in ax.texts]
    assert texts.count("no training loss (log it with --logging_steps N)") == 2
    bars = next(f for f, p in drawn if str(p).endswith("best_test.png"))
    (ax,) = bars.axes
    assert [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] == [
        "zero-shot SST2: 55.0"]
    assert len(ax.patches) == 1   # the trained method's bar; zero-shot is the line
    assert "\n" in ax.get_title()   # two lines: nothing cut off at the figure's width


def test_checkpoint_folders_are_those_runs_names(tmp_path):
    """report.py reads checkpoint names as runs.py does (runs.checkpoint_step): results in checkpoint-N are passed
    over and a run's curves come from its newest checkpoint-N, but a folder that only starts with "checkpoint-" is
    neither (report.py read "checkpoint-old-90" as the checkpoint of step 90, and skipped "checkpoint-notes")."""
    trainer_state(tmp_path / "output" / "b" / "checkpoint-20", [(10, 1.0)], [(20, 0.5)])
    trainer_state(tmp_path / "output" / "b" / "checkpoint-old-90", [(10, 2.0), (90, 3.0)], [(90, 0.1)])
    b = write_result(tmp_path, "b", {"accuracy": 0.7}, run_dir="output/b")
    assert report.curves(report.Run(b, json.loads(b.read_text())), "eval_accuracy") == \
        {"loss": [(10, 1.0)], "dev": [(20, 0.5)]}
    for folder in ("checkpoint-3", "checkpoint-notes"):
        (tmp_path / folder).mkdir()
        write_result(tmp_path / folder, folder, {"accuracy": 0.5})
    found, _ = report.find_results([tmp_path])
    assert sorted(r.path.relative_to(tmp_path).as_posix() for r in found) == \
        ["b.json", "checkpoint-notes/checkpoint-notes.json"]


def test_prompt_versions_are_never_one_configuration(tmp_path):
    """The prompt version a result records (run.py: "prompt_version") is not a flag, yet results of two versions of
    a task's prompts must not be averaged as seeds of one configuration; results that predate the record are their
    own."""
    for name, seed, version in (("v1s0", 0, "1"), ("v1s1", 1, "1"), ("v2s0", 0, "2"), ("old", 0, None)):
        path = write_result(tmp_path, name, {"accuracy": 0.5}, train_set_seed=seed)
        if version is not None:
            path.write_text(json.dumps(json.loads(path.read_text()) | {"prompt_version": version}))
    runs, _ = report.find_results([tmp_path])
    (group,) = report.group_runs(runs)
    assert {c.label: sorted(r.path.stem for r in c.runs) for c in group.configurations} == {
        "lr=0.001 eps=0.01 prompt_version=1": ["v1s0", "v1s1"], "lr=0.001 eps=0.01 prompt_version=2": ["v2s0"],
        "lr=0.001 eps=0.01 prompt_version=not recorded": ["old"]}
