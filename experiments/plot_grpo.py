"""Curves of GRPO-style runs from their metrics.jsonl: held-out exact match and the training reward.

    python experiments/plot_grpo.py outputs/pipeline/grpo outputs/pipeline/hrpo \
        --baseline 0.858 --out experiments/results/pipeline_grpo.png

Left: `eval/accuracy` at each evaluation, with the starting model's accuracy (`--baseline`, e.g.
from a 1-step run at a negligible lr) as a dashed line. Right: the sampled training `reward` (every
sampled completion, filtered groups included), as a running mean over `--window` steps. Each run is
labelled by its directory name and, when it has one, its model/thinking target.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"plot_grpo: no metrics.jsonl in {run_dir}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last `window` values at each index (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot(run_dirs: Sequence[Path], baseline: float | None, out: Path, window: int = 100) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, reward_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        evals = [(r["step"], 100 * r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
        train = [(r["step"], r["reward"]) for r in rows if "reward" in r and "step" in r]
        if not evals or not train:
            raise SystemExit(f"plot_grpo: {run_dir}/metrics.jsonl has no eval/accuracy or reward rows")
        acc_ax.plot(*zip(*evals), marker="o", label=run_dir.name)
        steps, rewards = zip(*train)
        reward_ax.plot(steps, running_mean(rewards, window), label=run_dir.name)
    if baseline is not None:
        acc_ax.axhline(100 * baseline, color="gray", linestyle="--", label=f"start {100 * baseline:.1f}%")
        acc_ax.axhline(100 * baseline + 5, color="gray", linestyle=":", label="start + 5 points")
    acc_ax.set(xlabel="step", ylabel="held-out exact match (%)", title="greedy accuracy, held-out questions")
    reward_ax.set(xlabel="step", ylabel="reward", title=f"sampled training reward (mean of {window} steps)")
    for ax in (acc_ax, reward_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with a metrics.jsonl")
    parser.add_argument("--baseline", type=float, default=None, help="the starting model's accuracy, 0-1")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--window", type=int, default=100, help="steps in the reward's running mean")
    args = parser.parse_args(argv)
    plot(args.runs, args.baseline, args.out, args.window)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
