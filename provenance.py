"""Where a result came from: package versions, the device, the code's git commit and the run's wall time.

    record = provenance.collect(model, started=time.time())     # when the model is loaded
    payload["provenance"] = provenance.finished(record)          # when the result is written: adds the wall time

A number in a result file is only comparable with another if both were produced by the same code on a known device
with known library versions; transformers and torch change kernels and defaults between releases. `git_commit` is the
commit of the checkout that holds this file, "unknown" outside a git checkout (an unpacked archive, a pip install) or
without git; `git_dirty` is True when tracked files differ from that commit, so the commit alone does not reproduce the
run (untracked files, such as result folders, do not count).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path

PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "numpy")
ROOT = Path(__file__).resolve().parent


def package_versions(packages=PACKAGES) -> dict[str, str | None]:
    """Installed versions by distribution metadata (no import: `datasets` alone takes seconds); None if absent."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(*arguments: str, cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *arguments], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git binary, or a hung filesystem
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state(root: Path = ROOT) -> dict:
    """{"git_commit": sha or "unknown", "git_dirty": bool or None (unknown)}."""
    commit = _git("rev-parse", "HEAD", cwd=root)
    if not commit:
        return {"git_commit": "unknown", "git_dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no", cwd=root)
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status)}


def device_of(model) -> str:
    """The device the model's input embeddings live on, with the accelerator's name or the CPU and thread count."""
    import torch
    device = model.get_input_embeddings().weight.device if model is not None else torch.device("cpu")
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " \
           f"{os.cpu_count()} cores)"


def _stamp(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(timespec="seconds")


def collect(model, started: float) -> dict:
    """Everything but the end time; `started` is time.time() at the start of the run."""
    return {"versions": package_versions() | {"python": platform.python_version()}, "device": device_of(model),
            **git_state(), "started_at": _stamp(started), "_started": started}


def finished(record: dict, now: float | None = None) -> dict:
    """The record with the end time and the wall time since the run started: loading the task and the model,
    training and evaluation (with several train sets, from the first set's start to this set's result)."""
    now = time.time() if now is None else now
    done = {k: v for k, v in record.items() if k != "_started"}
    return done | {"finished_at": _stamp(now), "wall_time_s": round(now - record["_started"], 1)}
