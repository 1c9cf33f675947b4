"""The distribution installs one import package, ``chatledger`` (DESIGN.md "Layout"):
built as a wheel from a copy of this source tree, installed into a folder of its own,
and run from there with ``python -m chatledger`` and its console script."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "node_modules"
)


def test_the_wheel_installs_chatledger_alone_and_runs(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=SKIP)  # an in-tree build leaves build/ behind
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
        check=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("chatledger-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["chatledger"]
    assert {name.split("/")[0] for name in names if not name.startswith("chatledger-")} == {
        "chatledger"
    }
    for expected in (
        "chatledger/__main__.py",
        "chatledger/server/cli.py",
        "chatledger/server/providers/demo.py",
        "chatledger/storage/log.py",
        "chatledger/static/index.html",
        "chatledger/static/app.js",
    ):
        assert expected in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "chatledger/tests/"))]

    target = tmp_path / "installed"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
        check=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run(
        [sys.executable, "-c", "import chatledger.server as s; print(s.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.strip().startswith(str(target / "chatledger"))
    for argv in (
        [sys.executable, "-m", "chatledger", "--help"],
        [str(target / "bin" / "chatledger"), "--help"],
    ):
        run = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert "serve" in run.stdout and "verify" in run.stdout
