"""CLI conventions and portability: -o on every writer, shell completion, numbered run folders, filelock locks,
and graft importing where fcntl and other POSIX-only modules do not exist (Windows)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import typer
from conftest import TINY
from typer.testing import CliRunner

import graft.cli  # noqa: F401  (registers the commands)
from graft.cli.shared import app
from graft.errors import GraftError
from graft.probing.cache import CacheSpace
from graft.training.checkpoints import run_lock
from graft.utils.outputs import numbered_folder

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
runner = CliRunner()
# every command that writes files; push uploads and precise-bn updates the run in place, so neither takes -o
WRITERS = {"fit", "demo", "lr-find", "compare", "diagnose", "stats", "export", "predict", "evaluate", "explain",
           "features", "probe", "shard", "suggest", "audit"}


def _options(name: str) -> set[str]:
    command = typer.main.get_command(app).commands[name]
    return {flag for parameter in command.params for flag in (*parameter.opts, *parameter.secondary_opts)}


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_every_command_that_writes_takes_o_and_output(name):
    assert {"-o", "--output"} <= _options(name)


def test_no_command_spells_output_without_o():
    commands = typer.main.get_command(app).commands
    assert WRITERS <= set(commands)
    for name in commands:
        options = _options(name)
        assert ("--output" in options) == ("-o" in options), name


def _fit_args(shapes, *extra):
    return ["fit", str(shapes), "--backbone", TINY, "--no-pretrained", "--strategy", "probe", "--epochs", "1",
            "--image-size", "32", "--workers", "0", "--batch-size", "16", "--limit-batches", "1", *extra]


def test_fit_without_o_numbers_its_run_folders(shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for number in (1, 2):
        result = runner.invoke(app, _fit_args(shapes))
        assert result.exit_code == 0, result.output
        assert f"run folder: {Path('runs') / f'graft-{number}'} (-o not given)" in result.output
        assert (tmp_path / "runs" / f"graft-{number}" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["graft-1", "graft-2"]


def test_o_and_a_config_file_output_are_used_as_given(shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, _fit_args(shapes, "-o", "mine"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mine" / "model.safetensors").is_file() and "run folder:" not in result.output
    config = tmp_path / "graft.yaml"
    config.write_text("output: from-yaml\n")
    result = runner.invoke(app, _fit_args(shapes, "--config", str(config)))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "from-yaml" / "model.safetensors").is_file() and not (tmp_path / "runs").exists()
    result = runner.invoke(app, _fit_args(shapes, "-o", "mine"))  # -o as before: a finished run is not replaced
    assert result.exit_code == 2 and "--overwrite" in result.output


def test_a_failed_fit_without_o_leaves_no_numbered_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["fit", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "error:" in result.output
    assert not (tmp_path / "runs" / "graft-1").exists()
    result = runner.invoke(app, ["fit", "--resume"])
    assert result.exit_code == 2 and "--resume needs the run to continue" in result.output


def test_numbered_folders_are_claimed_once_even_when_asked_at_once(tmp_path):
    (tmp_path / "graft-2").mkdir()  # taken by hand: skipped, and the gap before it is used
    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: numbered_folder(tmp_path / "graft"), range(8)))
    assert len(set(folders)) == 8 and all(folder.is_dir() for folder in folders)
    assert sorted(int(folder.name.split("-")[1]) for folder in folders) == [1, 3, 4, 5, 6, 7, 8, 9]


def test_shell_completion_is_enabled_and_completes_commands_and_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "--install-completion" in result.output and "--show-completion" in result.output
    graft = Path(sys.executable).with_name("graft")  # the installed command: its name keys the completion variable
    assert graft.is_file(), "pip install -e . installs the graft command beside python"
    for words, expected in (("graft fi", "fit"), ("graft predict --ou", "--output")):
        env = {**ENV, "_GRAFT_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": "1" if " fi" in words
               else "2"}
        done = subprocess.run([str(graft)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and expected in done.stdout.split(), (done.stdout, done.stderr)


_HOLD = """
import sys, time
from pathlib import Path
from graft.training.checkpoints import run_lock
with run_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_run_lock_names_the_holder_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(GraftError, match=rf"another graft fit \(pid {holder.pid}\) is writing"):
            with run_lock(run_dir):
                pass
    finally:
        holder.send_signal(getattr(signal, "SIGKILL", signal.SIGTERM))  # no clean-up code runs
        holder.wait(timeout=60)
    with run_lock(run_dir):  # the OS dropped the dead process's lock
        assert (run_dir / ".graft.lock.pid").read_text().strip() == str(os.getpid())
    assert not (run_dir / ".graft.lock").exists() and not (run_dir / ".graft.lock.pid").exists()


def test_the_cache_index_lock_serialises_writers(tmp_path):
    space = CacheSpace(tmp_path / "space", {"network": "x"})
    inside, order = threading.Event(), []

    def second():
        inside.wait(timeout=30)
        with space.locked():
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    with space.locked():
        inside.set()
        time.sleep(0.3)  # the other writer is waiting on the lock meanwhile
        order.append("first")
    thread.join(timeout=30)
    assert order == ["first", "second"]


_IMPORT_ALL = """
import sys
for name in ("fcntl", "resource", "pwd", "grp", "termios"):
    sys.modules[name] = None  # as on Windows: importing them raises ImportError
import importlib, pkgutil, graft
names = [m.name for m in pkgutil.walk_packages(graft.__path__, "graft.") if m.name != "graft.__main__"]
failed = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception as error:
        failed.append(f"{name}: {error!r}")
print(len(names), failed)
"""


def test_every_graft_module_imports_without_posix_only_modules():
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    count, failed = done.stdout.strip().split(" ", 1)
    assert int(count) > 50 and failed == "[]", done.stdout


def test_no_graft_module_imports_a_posix_only_module_at_top_level():
    import ast  # here: only this test reads source

    posix_only = {"fcntl", "resource", "pwd", "grp", "termios", "posix", "pty", "tty"}
    for path in (ROOT / "graft").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not posix_only & {name.split(".")[0] for name in names}, path
        assert "os.fchmod(" not in path.read_text(), path  # Unix only: os.chmod on the path instead
