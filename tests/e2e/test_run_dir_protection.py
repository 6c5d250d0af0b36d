"""A new run started in a directory that already holds one is refused, and the refusal changes
nothing there: not Hydra's .hydra/ snapshot (written before the job starts), not a sweep job's
result.json, not the sweep summary's row for that job."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from tests.e2e.test_cli import SMOKE, run_cli

SNAPSHOT = {"config.yaml": "seed: 0\n", "hydra.yaml": "hydra: {}\n", "overrides.yaml": "- optimizer.lr=0.001\n"}


def finished_run(run_dir: Path) -> dict[str, bytes]:
    """A run directory as a completed run leaves it (the parts a refusal could touch); its files' bytes."""
    (run_dir / ".hydra").mkdir(parents=True)
    for name, text in SNAPSHOT.items():
        (run_dir / ".hydra" / name).write_text(text)
    (run_dir / "run.json").write_text(json.dumps({"status": "completed", "final_metrics": {"eval/loss": 4.25}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 8, "loss": 4.3, "eval/loss": 4.25}) + "\n")
    return files(run_dir)


def files(run_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_refused_rerun_leaves_the_runs_hydra_snapshot_as_it_was(tmp_path):
    run = tmp_path / "full"
    before = finished_run(run)
    result = run_cli(*SMOKE, "optimizer.lr=0.1", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode != 0
    assert f"{run} already holds a run (run.json): continue it with resume={run}" in result.stderr
    after = files(run)
    after.pop("train.log", None)                       # the log is appended to, never rewritten
    assert after == before


def test_a_refused_sweep_job_keeps_its_result_and_its_row_in_the_summary(tmp_path):
    sweep = tmp_path / "sweep"
    before = finished_run(sweep / "0")
    original = {"job": "0", "overrides": ["optimizer.lr=0.001"], "status": "COMPLETED", "return_value": 4.25}
    (sweep / "0" / "result.json").write_text(json.dumps(original))
    before["result.json"] = (sweep / "0" / "result.json").read_bytes()
    result = run_cli("-m", *SMOKE, "optimizer.lr=0.1", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode != 0 and f"{sweep / '0'} already holds a run" in result.stderr
    after = files(sweep / "0")
    after.pop("train.log", None)
    assert after == before
    row = next(line for line in (sweep / "summary.md").read_text().splitlines() if line.startswith("| 0 |"))
    assert row.startswith("| 0 | `optimizer.lr=0.001` | COMPLETED | **4.2500** |")


def test_the_snapshot_goes_to_hydra_unless_the_directory_holds_a_run(tmp_path):
    def snapshot_dir(output_dir: Path, resume: str | None = None) -> str | None:
        cfg = OmegaConf.create({"resume": resume, "hydra": {"runtime": {"output_dir": str(output_dir)},
                                                            "output_subdir": "${llmtrain.snapshot_dir:${resume}}"}})
        return cfg.hydra.output_subdir

    assert snapshot_dir(tmp_path / "new") == ".hydra"
    (tmp_path / "run.json").write_text("{}")
    assert snapshot_dir(tmp_path) is None                          # refused later: Hydra writes no snapshot
    assert snapshot_dir(tmp_path, resume=str(tmp_path)).startswith(".hydra/resume_")   # next to the original
