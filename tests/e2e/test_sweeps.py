"""Sweeps through the real CLI: a failed job does not stop the others, and the summary says so;
`llmtrain reproduce` matches a run and names the first difference after a change."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

from tests.e2e.test_cli import SMOKE, rows, run_cli


def llmtrain(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmtrain.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_a_failed_job_leaves_the_others_and_the_summary_marks_it(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli("-m", f"hydra.sweep.dir={sweep}", *SMOKE, "optimizer.lr=1e-4,-1,1e-3", cwd=tmp_path)
    assert result.returncode != 0                            # Hydra reports the failure ...
    for job in ("0", "2"):                                   # ... after the other jobs completed
        assert json.loads((sweep / job / "run.json").read_text())["status"] == "completed"
        assert json.loads((sweep / job / "result.json").read_text())["status"] == "COMPLETED"
    failed = json.loads((sweep / "1" / "result.json").read_text())
    assert failed["status"] == "FAILED" and "optimizer.lr=-1 must be > 0" in failed["error"]
    table = list(csv.DictReader((sweep / "summary.csv").open()))
    assert [r["status"] for r in table] == ["COMPLETED", "FAILED", "COMPLETED"]
    swept = [r["overrides"].split()[-1] for r in table]                  # Hydra writes 1e-4 as 0.0001
    assert swept == ["optimizer.lr=0.0001", "optimizer.lr=-1", "optimizer.lr=0.001"]
    for row, job in ((table[0], "0"), (table[2], "2")):
        evals = [r["eval/loss"] for r in rows(sweep / job) if "eval/loss" in r]
        assert float(row["final_eval_loss"]) == evals[-1] and float(row["best_eval_loss"]) == min(evals)
        assert row["accuracy"] != "" and row["steps"] == "8"
    assert "**FAILED**" in (sweep / "summary.md").read_text()
    assert (sweep / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_reproduce_matches_then_names_the_first_difference_after_a_config_change(tmp_path):
    run = tmp_path / "run"
    assert run_cli(*SMOKE, f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    same = llmtrain("reproduce", str(run), cwd=tmp_path)
    assert same.returncode == 0, same.stderr
    report = json.loads((tmp_path / "run.reproduce" / "reproduce.json").read_text())
    assert report["match"] and report["final_weights_identical"] and report["first_difference"] is None
    assert not any("resumed" in w for w in report["warnings"])     # a run never resumed: no false alarm
    assert len(rows(tmp_path / "run.reproduce")) == len(rows(run)) == 8
    assert (run / "metrics.jsonl").read_text().count("\n") == 8      # the original is left alone

    snapshot = run / "resolved_config.yaml"                 # change a value in the run's config file
    snapshot.write_text(snapshot.read_text().replace("warmup_steps: 2", "warmup_steps: 4"))
    changed = llmtrain("reproduce", str(run), cwd=tmp_path)
    assert changed.returncode == 1
    report = json.loads((tmp_path / "run.reproduce_2" / "reproduce.json").read_text())
    assert not report["match"] and report["first_difference"].startswith("step 1: lr = ")
    assert "step 1: lr" in changed.stdout + changed.stderr


def test_reproduce_refuses_a_directory_without_a_snapshot(tmp_path):
    result = llmtrain("reproduce", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and "no resolved_config.yaml" in result.stderr
