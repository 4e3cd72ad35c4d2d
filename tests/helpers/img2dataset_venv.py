"""The img2dataset virtual environment for tests/integration/test_img2dataset.py (not a test module).

img2dataset pins ``webdataset<0.3`` (this project uses webdataset 1.x), so it gets a venv of its own,
by default ``$XDG_CACHE_HOME/msmedcap/img2dataset-venv`` (``~/.cache/...``), or
``$MSMEDCAP_IMG2DATASET_VENV``. ``python tests/helpers/img2dataset_venv.py`` creates it (``.ci/run`` does) and
prints the path of its ``img2dataset`` command.
"""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

REQUIREMENT = "img2dataset==1.47.0"  # the version the tests were written against


def venv_dir() -> Path:
    if os.environ.get("MSMEDCAP_IMG2DATASET_VENV"):
        return Path(os.environ["MSMEDCAP_IMG2DATASET_VENV"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "msmedcap" / "img2dataset-venv"


def img2dataset_command(create: bool = True, timeout: float = 900) -> Path:
    """Path of the venv's ``img2dataset``; creates the venv first when ``create``. Raises RuntimeError
    with the reason when it is not there and cannot be made (no network, no pip...)."""
    root = venv_dir()
    exe = root / "bin" / "img2dataset"
    if exe.is_file():
        return exe
    if not create:
        raise RuntimeError(f"no img2dataset venv at {root} (python tests/helpers/img2dataset_venv.py creates it)")
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(root)
        subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", REQUIREMENT], check=True,
                       timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except subprocess.CalledProcessError as e:
        tail = e.stdout.decode(errors="replace")[-800:] if e.stdout else ""
        raise RuntimeError(f"pip install {REQUIREMENT} into {root} failed: {tail}") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"could not create the img2dataset venv at {root}: {type(e).__name__}: {e}") from None
    if not exe.is_file():
        raise RuntimeError(f"{exe} missing after pip install {REQUIREMENT}")
    return exe


if __name__ == "__main__":
    try:
        print(img2dataset_command())
    except RuntimeError as e:
        print(f"img2dataset venv: {e}", file=sys.stderr)
        sys.exit(1)
