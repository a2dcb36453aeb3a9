"""models.py: the embedded model's one-time conversion to a plain Hugging Face folder."""

import os
import subprocess
import sys

from conftest import ROOT


def test_the_converted_embedded_model_is_readable_as_the_umask_allows(tmp_path):
    """mkdtemp made the cache folder 0700 and safetensors the weights 0600: a cache shared by a group was unreadable
    to it.  Converted for real (about 25 s), in a subprocess so the umask and the memory stay there."""
    cache = tmp_path / "cache"
    code = "import os, models; os.umask(0o002); print(models.embedded_model_path())"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, ZO_MODEL_CACHE=str(cache), HF_HUB_OFFLINE="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    folder = cache / "smollm2-135m"
    assert done.stdout.strip().endswith(str(folder))
    files = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(files)
    assert set(files.values()) == {"0o664"}, files
    assert oct(folder.stat().st_mode & 0o777) == "0o775"
