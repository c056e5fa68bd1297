"""The installed package: one top-level name, `offline_queue`, which lives beside PyPI's
`entrypoints` (a package Jupyter's tools depend on) in one environment."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_installs_one_package_beside_pypi_entrypoints(tmp_path: Path) -> None:
    source = tmp_path / "source"  # setuptools builds in the source tree: not in the checkout
    shutil.copytree(REPO / "offline_queue", source / "offline_queue")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(source),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("offline_queue-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"offline_queue"}

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
            "entrypoints==0.4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    # The dependencies (Prefect, SQLAlchemy, …) from this environment, after the venv's own.
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    code = (
        "import entrypoints, offline_queue, offline_queue.api.app, offline_queue.cli\n"
        "from offline_queue.flows.batch import batch_inference\n"
        "print(entrypoints.__file__); print(offline_queue.__file__)\n"
        "print(callable(entrypoints.get_group_all), batch_inference.name)\n"
    )
    done = subprocess.run(
        [str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    theirs, ours, both = done.stdout.strip().splitlines()[-3:]
    assert theirs.startswith(str(site)) and theirs.endswith("entrypoints.py")
    assert ours.startswith(str(site / "offline_queue"))
    assert both == "True batch-inference"
    command = subprocess.run(
        [str(venv / "bin" / "offline-queue"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert command.returncode == 0 and "gpu-time" in command.stdout, command.stderr
