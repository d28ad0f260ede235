"""`python -m sppo.run` as a user calls it: flags, and errors before any compute."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sppo.run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_help_documents_every_flag():
    done = run_cli("--help")
    assert done.returncode == 0
    for flag in ("--config", "--iters", "--resume-from", "--output-dir", "--set"):
        assert flag in done.stdout


def test_bad_override_is_rejected_with_the_field_named(tmp_path):
    done = run_cli("--config", "configs/tiny.yaml", "--set", "sampling.k=1", "--output-dir", str(tmp_path / "o"))
    assert done.returncode == 2
    assert "sampling.k" in done.stderr and "greater than or equal to 2" in done.stderr
    assert not (tmp_path / "o").exists()  # nothing was started or written


def test_resume_errors_come_before_any_compute(tmp_path):
    out = tmp_path / "o"
    done = run_cli("--config", "configs/tiny.yaml", "--iters", "3", "--resume-from", "4", "--output-dir", str(out))
    assert done.returncode == 2 and "between 1 and the number of iterations (3)" in done.stderr
    done = run_cli("--config", "configs/tiny.yaml", "--resume-from", "2", "--output-dir", str(out))
    assert done.returncode == 2 and "iteration 1's checkpoint" in done.stderr and "missing" in done.stderr
    assert not out.exists()
