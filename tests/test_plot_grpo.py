"""experiments/plot_grpo.py, the script behind experiments/results/pipeline_grpo.png."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "plot_grpo.py"
spec = importlib.util.spec_from_file_location("plot_grpo", SCRIPT)
plot_grpo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(plot_grpo)


def test_running_mean_over_a_window():
    assert plot_grpo.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def _run(tmp_path, name, with_eval=True):
    run = tmp_path / name
    run.mkdir()
    rows = [{"step": s, "reward": 0.8 + s / 1000} for s in range(1, 11)]
    if with_eval:
        rows[-1]["eval/accuracy"] = 0.9
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_plots_two_runs_into_a_png(tmp_path):
    out = tmp_path / "results" / "curves.png"
    plot_grpo.main([str(_run(tmp_path, "grpo")), str(_run(tmp_path, "hrpo")), "--baseline", "0.85",
                    "--out", str(out), "--window", "3"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_evaluations_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no eval/accuracy"):
        plot_grpo.main([str(_run(tmp_path, "bare", with_eval=False)), "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot_grpo.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
