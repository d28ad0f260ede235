"""`python -m sppo.report --output-dir DIR`: did the run learn? A table of iterations (win rates
with their intervals, final loss, stage times) and a PNG of win rate and loss per iteration,
read from the output directory's per-iteration metrics and logged to the job's parent MLflow run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sppo.run_directory import RUN_FILE, RunDirectory
from sppo.tracking import run_links

PLOT_FILE = "report.png"
STAGES = ("sampling", "judging", "training", "evaluation")


def iteration_metrics(out: Path) -> dict[int, dict[str, float]]:
    """Each finished iteration's metrics (iter-N/stage_metrics.json), by iteration number."""
    found = {}
    for path in out.glob("iter-*/stage_metrics.json"):
        name = path.parent.name[len("iter-"):]
        if name.isdigit() and int(name) > 0:
            found[int(name)] = RunDirectory(out).iteration(int(name)).read_metrics()
    return dict(sorted(found.items()))


def _rate(m: dict[str, float], key: str) -> str:
    if f"eval/{key}" not in m:
        return "-"
    return f"{m[f'eval/{key}']:.3f} [{m[f'eval/{key}_ci_low']:.2f}, {m[f'eval/{key}_ci_high']:.2f}]"


def table(metrics: dict[int, dict[str, float]]) -> str:
    header = ["iter", "win rate vs base [95% CI]", "win rate vs prev [95% CI]", "final loss",
              *(f"{s} s" for s in STAGES)]
    rows = [[str(t), _rate(m, "win_rate_vs_base"), _rate(m, "win_rate_vs_prev"),
             f"{m['train/final_loss']:.4g}" if "train/final_loss" in m else "-",
             *(f"{m[f'time/{s}_s']:.1f}" if f"time/{s}_s" in m else "-" for s in STAGES)]
            for t, m in metrics.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows])


def plot(metrics: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = list(metrics)
    fig, (rates, loss) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("win_rate_vs_base", "vs base (pi_0)"), ("win_rate_vs_prev", "vs previous (pi_{t-1})")):
        shown = [t for t in its if f"eval/{key}" in metrics[t]]
        if shown:
            mean = [metrics[t][f"eval/{key}"] for t in shown]
            low = [metrics[t][f"eval/{key}"] - metrics[t][f"eval/{key}_ci_low"] for t in shown]
            high = [metrics[t][f"eval/{key}_ci_high"] - metrics[t][f"eval/{key}"] for t in shown]
            rates.errorbar(shown, mean, yerr=[low, high], marker="o", capsize=4, label=label)
    rates.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    rates.set(title="held-out win rate of pi_t (95% CI)", xlabel="iteration", ylabel="win rate", ylim=(0, 1))
    if rates.get_legend_handles_labels()[0]:  # a run without held-out evaluation has no curves
        rates.legend()
    shown = [t for t in its if "train/final_loss" in metrics[t]]
    loss.plot(shown, [metrics[t]["train/final_loss"] for t in shown], marker="o")
    loss.set(title="final training loss", xlabel="iteration", ylabel="loss")
    for ax in (rates, loss):
        ax.set_xticks(its)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_to_mlflow(out: Path, path: Path) -> str:
    """Log the plot to the job's parent run (from <output_dir>/run.json); returns the run id."""
    from mlflow import MlflowClient

    record = json.loads((out / RUN_FILE).read_text())
    MlflowClient(record["tracking_uri"]).log_artifact(record["parent_run_id"], str(path), "report")
    return record["parent_run_id"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sppo.report", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True, type=Path, help="the run's --output-dir")
    parser.add_argument("--no-mlflow", action="store_true", help="write the plot, do not log it to MLflow")
    args = parser.parse_args(argv)
    out = args.output_dir.resolve()
    metrics = iteration_metrics(out)
    if not metrics:
        print(f"error: {out}: no iterations with metrics (iter-N/stage_metrics.json)", file=sys.stderr)
        return 2
    print(table(metrics))
    plot(metrics, out / PLOT_FILE)
    print(f"\nplot: {out / PLOT_FILE}")
    if not args.no_mlflow and (out / RUN_FILE).exists():
        print(f"logged to MLflow run {log_to_mlflow(out, out / PLOT_FILE)} as report/{PLOT_FILE}")
        links = run_links(out)
        print(f"MLflow runs:      {links['runs']}\nMLflow curves:    {links['curves']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
