"""scripts/setup.sh pays the installs once: a second run with nothing changed reuses the venv.

The venv here is a stand-in whose ``python`` records ``-m pip`` calls instead of
running them (and runs everything else with the test's interpreter), so the
test installs nothing and needs no network.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SETUP = os.path.join(ROOT, "scripts", "setup.sh")


def _fake_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    log = tmp_path / "pip.log"
    py = venv / "bin" / "python"
    py.write_text("#!/usr/bin/env bash\n"
                  f'if [ "$1 $2" = "-m pip" ]; then echo "$*" >> {log}; exit 0; fi\n'
                  f'exec {sys.executable} "$@"\n')
    py.chmod(0o755)
    return venv, log


def _setup(venv, **env):
    env = dict({k: v for k, v in os.environ.items() if k != "HEBA_SETUP_FORCE"},
               HEBA_VENV=str(venv), **env)
    proc = subprocess.run(["bash", SETUP], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def _pip_calls(log):
    return log.read_text().splitlines() if log.exists() else []


def test_second_run_reuses_the_venv_until_an_input_changes(tmp_path):
    venv, log = _fake_venv(tmp_path)
    first = _setup(venv, TORCH_CUDA_ARCH_LIST="8.0")
    calls = _pip_calls(log)
    assert len(calls) == 2 and "-r requirements-dev.txt" in calls[0] and "-e ." in calls[1], calls
    assert "reusing" not in first and (venv / ".heba-setup-stamp").is_file()

    again = _setup(venv, TORCH_CUDA_ARCH_LIST="8.0")
    assert _pip_calls(log) == calls, "nothing changed, yet pip ran again"
    assert f"== reusing {venv}: nothing changed" in again, again

    _setup(venv, TORCH_CUDA_ARCH_LIST="9.0")             # a build input changed
    assert len(_pip_calls(log)) == 4

    _setup(venv, TORCH_CUDA_ARCH_LIST="9.0", HEBA_SETUP_FORCE="1")
    assert len(_pip_calls(log)) == 6, "HEBA_SETUP_FORCE=1 must redo the installs"
