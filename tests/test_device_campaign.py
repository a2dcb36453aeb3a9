"""bench/device_campaign.sh end to end on the CPU with a tiny model: what a lent GPU machine would run, so that its
few minutes are not spent finding a broken script. (The GGUF halves of `prepare` are checked where the package is.)"""

import json
import os
import subprocess
import sys
import tarfile

from conftest import ROOT, shared_data_or_skip


def campaign(tmp_path, phase, **env):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("LRS", "OPTIMS", "TASK", "MODEL"))}
    environment.update(OUT=str(tmp_path / "out"), ROOT_OUT=str(tmp_path / "work"), OMP_NUM_THREADS="1",
                       PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", **env)
    (tmp_path / "out").mkdir(exist_ok=True)
    return subprocess.run(["bash", str(ROOT / "bench" / "device_campaign.sh"), phase], env=environment,
                          capture_output=True, text=True, timeout=1200, cwd=tmp_path)


def test_the_grid_phase_runs_every_stage_and_returns_one_archive(tmp_path, tiny_llama_dir):
    """SST2 over each method's LR list, seeds 1 and 2 at the dev-best LR, the second task at that LR and the next one
    up; zero-shot references; result files and curves (no checkpoints) in the archive; nothing starts after LIMIT."""
    grid = dict(MODEL=str(tiny_llama_dir), DATA=str(shared_data_or_skip()), OPTIMS="mezo adam", LRS_mezo="1e-3 1e-4",
                LRS_adam="1e-4", FORWARDS="4", EVAL_FORWARDS="2", SIZES="16 4 4", BS="4", JOBS="2", THREADS="1",
                SECOND_TASK="Copa", LIMIT="3600")   # no deadline in the way on a loaded machine (the default is 360 s)
    done = campaign(tmp_path, "grid", **grid)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    with tarfile.open(tmp_path / "out" / "device-grid.tgz") as archive:
        names = archive.getnames()
    results = sorted(n for n in names if n.count("/") == 2 and "-seed" in n and n.endswith(".json"))
    sst2 = [n for n in results if n.startswith("./sst2-lora-4/")]
    copa = [n for n in results if n.startswith("./Copa-lora-4/")]
    assert len(sst2) == 3 + 2 * 2 and len(copa) == 2 * 2, results          # 3 + seeds 1, 2 of 2 methods; 2 LRs each
    assert {"./sst2-lora-4/zero-shot.json", "./Copa-lora-4/zero-shot.json"} <= set(names)
    assert not any("checkpoint-" in n for n in names)
    assert any(n.endswith("trainer_state.json") for n in names)
    assert (tmp_path / "work" / "sst2-selected.csv").read_text().count(",lora,") == 2   # report.py selected both
    seeds = [n for n in sst2 if "-seed1-" in n or "-seed2-" in n]
    selected = {n.split("-mezo-lora-")[1].split("-eps")[0] for n in seeds if "-mezo-" in n}
    assert len(selected) == 1   # one LR, the dev-best one, for the extra seeds
    up = {"lr1e-3": "lr3e-3", "lr1e-4": "lr3e-4"}[selected.pop()]
    assert any(f"-mezo-lora-{up}-" in n for n in copa) and any("-adam-lora-lr3e-4-" in n for n in copa)
    record = json.loads((tmp_path / "work" / sst2[0][2:]).read_text())
    assert record["config"]["load_float16"] is False   # fp32, whatever the device

    late = campaign(tmp_path, "grid", **{**grid, "LIMIT": "0", "LRS_mezo": "3e-2"})   # no time left
    assert late.returncode == 1 and "not started before STOP_AT" in (late.stdout + late.stderr)
    assert not list((tmp_path / "work" / "sst2-lora-4").glob("*-lr3e-2-*.json"))


def test_the_offload_phase_writes_one_report_per_bench_run(tmp_path, tiny_llama_dir):
    done = campaign(tmp_path, "offload", OFFLOAD_SHAPES="tiny tiny tiny", CUDA_VISIBLE_DEVICES="",
                    OFFLOAD_ARGS="--dtype float32 --batch 2 --seq 16", PROBE_SHAPE="random:tiny", PROBE_DTYPE="float32",
                    TRAINER_SHAPE="tiny",
                    TOKENIZER=str(tiny_llama_dir), DATA=str(shared_data_or_skip()), TIMEOUT_SCALE="20")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = {p.name: json.loads(p.read_text()) for p in (tmp_path / "out").glob("offload-tiny-*.json")}
    assert set(reports) == {"offload-tiny-mezo-16gib.json", "offload-tiny-zo_adamu-16gib.json",
                            "offload-tiny-mezo-full.json", "offload-tiny-plan.json"}, done.stdout
    probes = json.loads((tmp_path / "out" / "probe-modes.json").read_text())   # the step per probe mode
    assert all(f"S_mezo_{mode}" in json.dumps(probes) for mode in ("forward", "onepass")), probes
    trainer = json.loads((tmp_path / "out" / "offload-trainer.json").read_text())   # run.py through the Trainer
    assert trainer["ran"] == {"resident": True, "streamed": True, "resumed": True}, trainer
    assert trainer["streamed_equals_resident"] and trainer["resumed_equals_streamed"], trainer
    assert trainer["resumed_from_checkpoint"] and trainer["offload"]["blocks"] == 2
    assert all(r["gpu_measured"] is False for r in reports.values())
    assert reports["offload-tiny-mezo-full.json"]["equal_weights"] is True
    assert "streamed" not in reports["offload-tiny-plan.json"]
