"""Sweep summaries from job directories: rows, failures, unfinished jobs, and the plot file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmtrain import sweep
from tests.conftest import compose_cfg

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_job(root: Path, name: str, overrides: list[str], result: dict | None = None, record: dict | None = None,
             rows: list[dict] | None = None, tail: str = "") -> Path:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    if result is not None:
        (job / "result.json").write_text(json.dumps({"overrides": overrides, **result}))
    if record is not None:
        (job / "run.json").write_text(json.dumps(record))
    if rows is not None:
        (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return job


def curve(lr_scale: float, steps: int = 4) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 5.0 - lr_scale * step, "lr": 1e-3}
        if step % 2 == 0:
            row.update({"eval/loss": 5.2 - lr_scale * step, "eval/accuracy": 0.1 * step})
        rows.append(row)
    return rows


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    make_job(tmp_path, "0", ["optimizer.lr=1e-4"], {"status": "COMPLETED", "duration_s": 3.0},
             {"status": "completed", "final_metrics": {"eval/loss": 4.8, "eval/accuracy": 0.4}}, curve(0.1))
    failure = {"status": "FAILED", "error": "ValueError: optimizer.lr=-1 must be > 0", "duration_s": 0.1}
    make_job(tmp_path, "1", ["optimizer.lr=-1"], failure)
    make_job(tmp_path, "2", ["optimizer.lr=1e-3"], {"status": "COMPLETED", "duration_s": 2.0},
             {"status": "completed", "final_metrics": {"eval/loss": 4.4, "eval/accuracy": 0.4}}, curve(0.2))
    # killed mid-run: no result.json, run.json still says running, the last line cut short
    make_job(tmp_path, "10", ["optimizer.lr=3e-3"], None, {"status": "running"}, curve(0.3, 3), tail='{"step": 4, "lo')
    return tmp_path


def test_summary_has_one_row_per_job_with_failures_and_unfinished_jobs(sweep_dir):
    jobs = sweep.write_summary(sweep_dir)
    assert [j.job for j in jobs] == ["0", "1", "2", "10"]           # numeric order, not 0, 1, 10, 2
    rows = list(csv.DictReader((sweep_dir / "summary.csv").open()))
    assert [r["status"] for r in rows] == ["COMPLETED", "FAILED", "COMPLETED", "RUNNING"]
    first = rows[0]
    assert first["overrides"] == "optimizer.lr=1e-4"
    assert float(first["final_eval_loss"]) == pytest.approx(5.2 - 0.4) and float(first["best_eval_loss"]) == \
        pytest.approx(5.2 - 0.4) and first["best_step"] == "4"
    assert float(first["accuracy"]) == 0.4 and first["steps"] == "4" and first["duration_s"] == "3.0"
    assert rows[1]["error"] == "ValueError: optimizer.lr=-1 must be > 0" and rows[1]["final_eval_loss"] == ""
    assert rows[3]["steps"] == "3" and float(rows[3]["best_eval_loss"]) == pytest.approx(5.2 - 0.6)
    md = (sweep_dir / "summary.md").read_text()
    assert "4 job(s): 2 completed, 1 failed, 1 other" in md
    assert "| 1 | `optimizer.lr=-1` | **FAILED** |" in md and "job 1: ValueError: optimizer.lr=-1 must be > 0" in md
    assert "**4.4000**" in md                        # the best completed job's final eval loss is bold
    assert (sweep_dir / "summary.png").read_bytes().startswith(PNG_MAGIC)


def test_best_eval_loss_is_the_minimum_over_evaluations(tmp_path):
    rows = [{"step": 1, "loss": 3.0, "eval/loss": 2.0}, {"step": 2, "loss": 2.5, "eval/loss": 1.5},
            {"step": 3, "loss": 2.0, "eval/loss": 1.7}]
    make_job(tmp_path, "0", ["x=1"], {"status": "COMPLETED"}, {"status": "completed", "final_metrics": {}}, rows)
    (job,) = sweep.write_summary(tmp_path)
    assert (job.final_eval_loss, job.best_eval_loss, job.best_step) == (1.7, 1.5, 2)


def test_preference_accuracy_is_used_when_there_is_no_exact_match(tmp_path):
    make_job(tmp_path, "0", ["strategy=dpo"], {"status": "COMPLETED"},
             {"status": "completed", "final_metrics": {"eval/loss": 0.3, "eval/rewards/accuracies": 0.9}}, [])
    assert sweep.write_summary(tmp_path)[0].accuracy == 0.9


def test_summarize_command_rebuilds_the_files(sweep_dir, capsys):
    from llmtrain.cli import main
    assert main(["summarize", str(sweep_dir)]) == 0
    out = capsys.readouterr().out
    assert "**FAILED**" in out and "summary.csv" in out
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert (sweep_dir / name).stat().st_size > 0


def test_summarize_an_empty_directory_says_so(tmp_path, capsys):
    from llmtrain.cli import main
    assert main(["summarize", str(tmp_path)]) == 1
    assert "no job directories" in capsys.readouterr().out


def test_labels_show_only_what_the_sweep_varies():
    jobs = [sweep.JobSummary("0", ["a=1", "debug=smoke"], "COMPLETED"),
            sweep.JobSummary("1", ["a=2", "debug=smoke"], "COMPLETED")]
    assert sweep._labels(jobs) == ["a=1", "a=2"]
    sampled = [sweep.JobSummary("0", ["optimizer.lr=0.0021107211086166433", "x=abcdefghij"], "COMPLETED")]
    assert sweep._labels(sampled + jobs)[0] == "optimizer.lr=0.00211 x=abcdefghij"


@pytest.mark.parametrize("launcher, target", [
    ("parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_ready_made_launchers_compose(launcher, target, tmp_path):
    from hydra.core.hydra_config import HydraConfig
    compose_cfg(f"hydra/launcher={launcher}", f"paths.output_dir={tmp_path}")
    node = HydraConfig.get().launcher
    assert node._target_ == target
    if launcher == "slurm":
        raw = OmegaConf.to_container(node, resolve=False)
        assert raw["timeout_min"] == 240 and raw["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    else:
        assert node.n_jobs == 2


def test_the_job_result_callback_is_registered(tmp_path):
    from hydra.core.hydra_config import HydraConfig
    compose_cfg(f"paths.output_dir={tmp_path}")
    assert HydraConfig.get().callbacks.job_result._target_ == "llmtrain.sweep.JobResult"


def job_end(job_dir: Path, status: str, value) -> None:
    """JobResult's hooks for one job of a multirun in `job_dir`, as Hydra calls them."""
    from types import SimpleNamespace

    from hydra.core.utils import JobStatus
    from hydra.types import RunMode

    hydra = {"mode": RunMode.MULTIRUN, "sweep": {"dir": str(job_dir.parent)}, "runtime": {"output_dir": str(job_dir)}}
    config = OmegaConf.create({"resume": None, "hydra": hydra})
    job_dir.mkdir(exist_ok=True)                                   # Hydra creates it before the job starts
    callback = sweep.JobResult()
    callback.on_job_start(config)
    if status == "COMPLETED":                                      # what entry.claim_run_dir leaves for a new run
        (job_dir / "run.json").write_text('{"status": "completed"}')
    callback.on_job_end(config, SimpleNamespace(status=JobStatus[status], _return_value=value,
                                                overrides=["optimizer.lr=0.1"]))


def test_a_job_refused_because_its_directory_holds_a_run_keeps_that_runs_result(tmp_path):
    job = make_job(tmp_path, "0", ["optimizer.lr=1e-4"], {"status": "COMPLETED", "duration_s": 3.0},
                   {"status": "completed", "final_metrics": {"eval/loss": 4.8}}, curve(0.1))
    before = (job / "result.json").read_text()
    job_end(job, "FAILED", ValueError(f"{job} already holds a run (run.json)"))
    assert (job / "result.json").read_text() == before
    (row,) = csv.DictReader((tmp_path / "summary.csv").open())
    assert (row["overrides"], row["status"], row["error"]) == ("optimizer.lr=1e-4", "COMPLETED", "")


def test_a_new_job_writes_its_result(tmp_path):
    job_end(tmp_path / "0", "COMPLETED", 4.5)
    result = json.loads((tmp_path / "0" / "result.json").read_text())
    assert (result["overrides"], result["status"], result["return_value"]) == (["optimizer.lr=0.1"], "COMPLETED", 4.5)
