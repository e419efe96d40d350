"""Issue 18, item 5: what a killed run leaves is cleaned up by the next one. The native reference's disk
offload folders are named by host and pid, and the next native run removes those whose process is
gone; the Makefile rebuilds a .venv that no longer works (a moved project)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_offload.analysis.native_runs import offload_folder, remove_stale_offload, run_native_reference

from conftest import REPO

HOST = socket.gethostname()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _folder(root: Path, name: str, age_s: float = 0) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "weights.dat").write_bytes(b"\0" * 1024)  # as accelerate leaves them
    if age_s:
        past = time.time() - age_s
        os.utime(folder, (past, past))
    return folder


@pytest.fixture
def live_process():
    """A process that started before any folder of the test: it may own one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(1.5)  # create_time has a resolution of about 10 ms, the slack a second
    yield proc.pid
    proc.kill()
    proc.wait()


def test_only_stale_offload_folders_are_removed(tmp_path, live_process):
    root = tmp_path / "results/generate"
    dead = _folder(root, f".offload.{HOST}.{_dead_pid()}")
    mine_before = _folder(root, f".offload.{HOST}.{os.getpid()}")  # a killed run of the same pid: not this one
    live = _folder(root, f".offload.{HOST}.{live_process}")
    # the pid of a live process that started after the folder last changed: the pid was reused
    reused = _folder(root, f".offload.{HOST}.{os.getppid()}", age_s=10 * 365 * 86400)
    other_host = _folder(root, f".offload.another-node.cluster.{_dead_pid()}")
    legacy = _folder(root, ".offload.k2j9x_q1")  # tempfile's name, before folders were named by pid
    removed = remove_stale_offload(root)
    assert sorted(removed) == sorted([dead, mine_before, reused])
    assert not dead.exists() and not mine_before.exists() and not reused.exists()
    assert live.is_dir() and (live / "weights.dat").is_file()
    assert other_host.is_dir() and legacy.is_dir()
    assert offload_folder(root) == root / f".offload.{HOST}.{os.getpid()}"


def test_the_native_reference_removes_a_killed_runs_folder_and_its_own(omni_ckpt, tmp_path, live_process):
    root = tmp_path / "results/generate"
    stale = _folder(root, f".offload.{HOST}.{_dead_pid()}")
    live = _folder(root, f".offload.{HOST}.{live_process}")
    result = run_native_reference(omni_ckpt, ["The capital of France is"], 2, "cpu", "float32", 1, None, root,
                                  root / "native_reference.json", root / "native_logits.safetensors")
    assert result["offload"]["offloaded_to_disk_bytes"] > 0  # a 1 MiB budget: the folder was really used
    assert not stale.exists() and not offload_folder(root).exists()
    assert sorted(root.glob(".offload.*")) == [live]


# --- the Makefile's .venv ---------------------------------------------------------------------------

def _make(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", "-C", str(project), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def project(tmp_path) -> Path:
    """The Makefile beside the package and a fake .venv whose stamp is newer than pyproject.toml."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy(REPO / "Makefile", root)
    shutil.copy(REPO / "pyproject.toml", root)
    shutil.copytree(REPO / "src/moe_offload", root / "src/moe_offload",
                    ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir = root / ".venv/bin"
    bin_dir.mkdir(parents=True)
    (root / ".venv/.installed").touch()
    return root


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _python_importing(src: Path) -> str:
    """A stand-in interpreter: the real one, importing moe_offload from src (as an editable install does)."""
    return f'PYTHONPATH={src} exec {sys.executable} "$@"'


def test_make_keeps_a_working_venv(project):
    _script(project / ".venv/bin/python", _python_importing(project / "src"))
    _script(project / ".venv/bin/snakemake", "exit 0")
    plan = _make(project, "dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "-m venv" not in plan.stdout and "pip install" not in plan.stdout
    assert ".venv/bin/snakemake -n results/compare.json" in plan.stdout


@pytest.mark.parametrize("broken", ["python", "snakemake", "moved", "copied"])
def test_make_rebuilds_a_venv_that_no_longer_works(project, broken):
    _script(project / ".venv/bin/python", "exit 1" if broken == "python" else _python_importing(project / "src"))
    _script(project / ".venv/bin/snakemake", "exit 1" if broken == "snakemake" else "exit 0")
    if broken == "moved":  # a moved project: entry points name an interpreter that is not there any more
        _script(project / ".venv/bin/snakemake", "exec /no/such/old/place/.venv/bin/python \"$@\"")
    if broken == "copied":  # a copied project's .venv still imports the original's code
        _script(project / ".venv/bin/python", _python_importing(REPO / "src"))
    for target in ("dry-run", "test", "run"):
        plan = _make(project, target)
        assert plan.returncode == 0, plan.stderr
        assert "-m venv --clear .venv" in plan.stdout and "pip install" in plan.stdout, (target, plan.stdout)
