"""`python -m sppo.report --output-dir DIR`: did the run learn, and which iteration to keep?

A table of iterations as the published cards give them (length-controlled and raw win rates vs the base,
mean length) with the win rate vs the previous iteration, final loss and stage times, the
champion and any gain that is mostly length; and a PNG of win rates, length and loss per
iteration. Read from the output directory's per-iteration metrics; the PNG is logged to the job's
parent MLflow run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sppo.evaluation import (CHAMPION_ALIAS, LC_VS_BASE, TRAINING_JUDGE, choose_champion, length_gain_warnings,
                             rate_text)
from sppo.run_directory import RUN_FILE, RunDirectory
from sppo.tracking import run_links

PLOT_FILE = "report.png"
STAGES = ("sampling", "judging", "training", "evaluation")
BASE_CHARS = "eval/base_mean_response_chars"


def iteration_metrics(out: Path) -> dict[int, dict[str, float]]:
    """Each finished iteration's metrics (iter-N/stage_metrics.json), by iteration number."""
    found = {}
    for path in out.glob("iter-*/stage_metrics.json"):
        name = path.parent.name[len("iter-"):]
        if name.isdigit() and int(name) > 0:
            found[int(name)] = RunDirectory(out).iteration(int(name)).read_metrics()
    return dict(sorted(found.items()))


def _chars(m: dict[str, float], key: str) -> str:
    return f"{m[key]:.0f}" if key in m else "-"


def table(metrics: dict[int, dict[str, float]]) -> str:
    """The iterations, a base row with pi_0's mean length, then the champion and length warnings."""
    champion = choose_champion(metrics)
    by_training_judge = any(f"{TRAINING_JUDGE}win_rate_vs_base" in m for m in metrics.values())
    header = ["iter", "LC win rate vs base [95% CI]", "win rate vs base [95% CI]", "length (chars)",
              "win rate vs prev [95% CI]",
              *(["LC vs base, training judge", "vs base, training judge"] if by_training_judge else []),
              "final loss", *(f"{s} s" for s in STAGES)]
    base = next((m for m in metrics.values() if BASE_CHARS in m), None)
    rows = [["base", "-", "-", _chars(base, BASE_CHARS), "-",
             *(["-", "-"] if by_training_judge else []), "-", *("-" for _ in STAGES)]] if base else []
    rows += [[f"{t}*" if t == champion.iteration else str(t), rate_text(m, LC_VS_BASE),
              rate_text(m, "eval/win_rate_vs_base"), _chars(m, "eval/mean_response_chars"),
              rate_text(m, "eval/win_rate_vs_prev"),
              *([rate_text(m, f"{TRAINING_JUDGE}{key}") for key in ("lc_win_rate_vs_base", "win_rate_vs_base")]
                if by_training_judge else []),
              f"{m['train/final_loss']:.4g}" if "train/final_loss" in m else "-",
              *(f"{m[f'time/{s}_s']:.1f}" if f"time/{s}_s" in m else "-" for s in STAGES)]
             for t, m in metrics.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    version = metrics[champion.iteration].get("registry/model_version") if champion.iteration else None
    registered = f" (registered version {version:.0f}, alias '{CHAMPION_ALIAS}')" if version is not None else ""
    lines.append(f"{'* ' if champion.iteration else ''}champion: {champion.reason}{registered}")
    lines += [f"iteration {t}: {w}" for t, m in metrics.items() for w in length_gain_warnings(m)]
    return "\n".join(lines)


def plot(metrics: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = list(metrics)
    champion = choose_champion(metrics).iteration
    fig, (rates, length, loss) = plt.subplots(1, 3, figsize=(15, 4))
    for key, label in (("lc_win_rate_vs_base", "LC vs base (pi_0)"), ("win_rate_vs_base", "vs base (pi_0)"),
                       ("win_rate_vs_prev", "vs previous (pi_{t-1})")):
        shown = [t for t in its if f"eval/{key}" in metrics[t]]
        if shown:
            mean = [metrics[t][f"eval/{key}"] for t in shown]
            low = [metrics[t][f"eval/{key}"] - metrics[t][f"eval/{key}_ci_low"] for t in shown]
            high = [metrics[t][f"eval/{key}_ci_high"] - metrics[t][f"eval/{key}"] for t in shown]
            rates.errorbar(shown, mean, yerr=[low, high], marker="o", capsize=4, label=label)
    if champion is not None:
        rates.plot([champion], [metrics[champion][LC_VS_BASE]], marker="*", markersize=16, color="gold",
                   markeredgecolor="black", linestyle="none", label="champion")
    rates.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    rates.set(title="held-out win rate of pi_t (95% CI)", xlabel="iteration", ylabel="win rate", ylim=(0, 1))
    if rates.get_legend_handles_labels()[0]:  # a run without held-out evaluation has no curves
        rates.legend()
    shown = [t for t in its if "eval/mean_response_chars" in metrics[t]]
    length.plot(shown, [metrics[t]["eval/mean_response_chars"] for t in shown], marker="o", label="pi_t")
    base = next((metrics[t][BASE_CHARS] for t in shown if BASE_CHARS in metrics[t]), None)
    if base is not None:  # pi_0's samples are drawn once: every iteration holds the same length
        length.axhline(base, color="grey", linestyle=":", linewidth=1, label="base (pi_0)")
        length.legend()
    length.set(title="mean held-out answer length", xlabel="iteration", ylabel="characters")
    shown = [t for t in its if "train/final_loss" in metrics[t]]
    loss.plot(shown, [metrics[t]["train/final_loss"] for t in shown], marker="o")
    loss.set(title="final training loss", xlabel="iteration", ylabel="loss")
    for ax in (rates, length, loss):
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
