"""Sweep results: one result.json per job, and summary.csv / summary.md / summary.png per sweep.

Hydra callbacks (registered in conf/hydra/default.yaml) do the writing:

- `JobResult.on_job_end` runs in the job's own process (in-process for the basic launcher, in a
  worker for joblib, on the node for submitit), writes `<job dir>/result.json` and then rebuilds the
  sweep's summary under a file lock. So the summary is complete after the last job ends, also when
  a job failed: then the basic launcher re-raises after the remaining jobs and never calls
  `on_multirun_end` (HYDRA.md 4.5), and callback state kept in memory would be lost with joblib.
  A job refused because its directory already holds a run (a sweep rerun into the same sweep dir)
  writes no result.json: the one there is that run's, and its summary row stays true.
- `JobResult.on_multirun_end` rebuilds it once more and says where it is.

`llmtrain summarize <sweep dir>` rebuilds the files from what the jobs left on disk (result.json,
run.json, metrics.jsonl, .hydra/overrides.yaml), e.g. after a sweep was killed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

COLUMNS = ("job", "overrides", "status", "final_eval_loss", "best_eval_loss", "best_step", "accuracy",
           "steps", "duration_s", "error")
ACCURACY_KEYS = ("eval/accuracy", "eval/rewards/accuracies")   # exact match; else held-out preference accuracy


@dataclass
class JobSummary:
    """One row of a sweep summary, read back from a job directory."""

    job: str
    overrides: list[str]
    status: str                                  # COMPLETED / FAILED (Hydra), else run.json's status
    final_eval_loss: float | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    accuracy: float | None = None                # final held-out accuracy (ACCURACY_KEYS)
    steps: int | None = None                     # last step in metrics.jsonl
    duration_s: float | None = None
    error: str | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)        # (step, train loss)
    eval_curve: list[tuple[int, float]] = field(default_factory=list)   # (step, eval loss)

    def row(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in COLUMNS}
        values["overrides"] = " ".join(self.overrides)
        return values


class JobResult(Callback):
    """Hydra callback: result.json for each job of a multirun, and the sweep summary after each job."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.held_run = False          # the job's directory held a run before it started: it will be refused

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from llmtrain.rundir import holds_run          # here: `llmtrain summarize` need not import torch

        self.started = time.time()
        self.held_run = config.get("resume") is None and holds_run(config.hydra.runtime.output_dir)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return                  # a single run's record is run.json; a result.json would only repeat it
        job_dir = Path(config.hydra.runtime.output_dir)
        status = job_return.status.name
        value = job_return._return_value                       # the exception, for a failed job
        result = {"job": job_dir.name, "overrides": list(job_return.overrides or []), "status": status,
                  "return_value": value if status == "COMPLETED" and _is_number(value) else None,
                  "error": None if status == "COMPLETED" else _one_line(value),
                  "duration_s": None if self.started is None else round(time.time() - self.started, 3)}
        refused = self.held_run and status != "COMPLETED"     # by entry.claim_run_dir
        if refused:
            log.error("job %s (%s) was refused, its directory is left as it was: %s", job_dir.name,
                      " ".join(result["overrides"]), result["error"])
        elif status != "COMPLETED":
            log.error("job %s (%s) failed: %s", job_dir.name, " ".join(result["overrides"]), result["error"],
                      exc_info=value if isinstance(value, BaseException) else None)
        if not refused:               # else result.json stays the earlier run's: its row keeps its own overrides
            _write_atomic(job_dir / "result.json", json.dumps(result, indent=2) + "\n")
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            rebuild(sweep_dir)
        except Exception as error:        # a summary problem must never turn a finished job into a failure
            log.warning("could not update the sweep summary in %s: %s (rebuild it with `llmtrain summarize %s`)",
                        sweep_dir, error, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = rebuild(sweep_dir)
        failed = sum(job.status != "COMPLETED" for job in jobs)
        log.info("sweep of %d job(s)%s: summary in %s (summary.md, summary.csv, summary.png)", len(jobs),
                 f", {failed} not completed" if failed else "", sweep_dir)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _one_line(error: Any) -> str:
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
    return " ".join(text.split())[:500]


def _write_atomic(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between the jobs of one sweep (joblib workers finish at the same time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            import fcntl
        except ImportError:       # Windows: no flock; jobs there run one at a time (basic launcher)
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """Directories of the sweep's jobs: those with Hydra's .hydra/overrides.yaml or a result.json."""
    found = {p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml") if p.parent.name == ".hydra"}
    found |= {p.parent for p in sweep_dir.rglob("result.json")}
    found.discard(sweep_dir)
    return sorted(found, key=lambda p: _natural_key(p.relative_to(sweep_dir).as_posix()))


def _natural_key(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def read_job(job_dir: Path, sweep_dir: Path) -> JobSummary:
    """Everything a summary row needs, from the files a job leaves (any of them may be missing)."""
    result = _read_json(job_dir / "result.json")
    record = _read_json(job_dir / "run.json")
    overrides = result.get("overrides")
    if overrides is None and (job_dir / ".hydra" / "overrides.yaml").is_file():
        overrides = OmegaConf.to_container(OmegaConf.load(job_dir / ".hydra" / "overrides.yaml"))
    status = result.get("status") or {"completed": "COMPLETED", "failed": "FAILED"}.get(
        record.get("status"), str(record.get("status", "unknown")).upper())
    job = JobSummary(job=job_dir.relative_to(sweep_dir).as_posix(), overrides=list(overrides or []), status=status,
                     error=result.get("error"), duration_s=result.get("duration_s", record.get("elapsed_s")))
    final_metrics = record.get("final_metrics") or {}
    last_eval: dict[str, float] = {}
    for row in _read_jsonl(job_dir / "metrics.jsonl"):
        step = int(row.get("step", 0))
        job.steps = step
        if _finite(row.get("loss")):
            job.curve.append((step, row["loss"]))
        if _finite(row.get("eval/loss")):
            job.eval_curve.append((step, row["eval/loss"]))
            last_eval = row
    if job.eval_curve:
        job.final_eval_loss = job.eval_curve[-1][1]
        job.best_step, job.best_eval_loss = min(job.eval_curve, key=lambda point: point[1])
    source = final_metrics or last_eval
    job.accuracy = next((source[k] for k in ACCURACY_KEYS if _finite(source.get(k))), None)
    return job


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        try:
            yield json.loads(line)
        except ValueError:        # a line cut short by a killed job
            continue


def rebuild(sweep_dir: Path) -> list[JobSummary]:
    """write_summary under the sweep's lock (jobs of a parallel launcher end at the same time)."""
    with _locked(Path(sweep_dir) / ".summary.lock"):
        return write_summary(sweep_dir)


def write_summary(sweep_dir: Path) -> list[JobSummary]:
    """Write summary.csv, summary.md and summary.png into `sweep_dir`; returns the rows."""
    sweep_dir = Path(sweep_dir)
    jobs = [read_job(d, sweep_dir) for d in job_dirs(sweep_dir)]
    _write_atomic(sweep_dir / "summary.csv", to_csv(jobs))
    _write_atomic(sweep_dir / "summary.md", to_markdown(jobs, sweep_dir))
    _write_atomic(sweep_dir / "summary.png", plot(jobs, sweep_dir.name))
    return jobs


def to_csv(jobs: Sequence[JobSummary]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for job in jobs:
        writer.writerow({k: "" if v is None else v for k, v in job.row().items()})
    return out.getvalue()


def _format(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def to_markdown(jobs: Sequence[JobSummary], sweep_dir: Path) -> str:
    """A table with one row per job; the best completed job's eval loss is bold, failures are named."""
    completed = [j for j in jobs if j.status == "COMPLETED" and j.final_eval_loss is not None]
    best = min(completed, key=lambda j: j.final_eval_loss) if completed else None
    lines = [f"# Sweep {sweep_dir.name}", "",
             f"{len(jobs)} job(s): {sum(j.status == 'COMPLETED' for j in jobs)} completed, "
             f"{sum(j.status == 'FAILED' for j in jobs)} failed, "
             f"{sum(j.status not in ('COMPLETED', 'FAILED') for j in jobs)} other (running, interrupted or unknown).",
             "", "| job | overrides | status | final eval loss | best eval loss (step) | held-out accuracy "
             "| steps | duration (s) |", "|---|---|---|---|---|---|---|---|"]
    for job in jobs:
        final = _format(job.final_eval_loss)
        if job is best:
            final = f"**{final}**"
        best_text = "" if job.best_eval_loss is None else f"{job.best_eval_loss:.4f} ({job.best_step})"
        status = job.status if job.status == "COMPLETED" else f"**{job.status}**"
        overrides = " ".join(f"`{o}`" for o in job.overrides)
        lines.append(f"| {job.job} | {overrides} | {status} | {final} | {best_text} | {_format(job.accuracy, 3)} "
                     f"| {_format(job.steps)} | {_format(job.duration_s, 1)} |")
    errors = [job for job in jobs if job.error]
    if errors:
        lines += ["", "Errors:", ""]
        lines += [f"- job {job.job}: {job.error.replace('|', '/')}" for job in errors]
    return "\n".join(lines) + "\n"


def _labels(jobs: Sequence[JobSummary]) -> list[str]:
    """Each job's overrides minus those every job shares (what the sweep varies)."""
    common = set.intersection(*(set(j.overrides) for j in jobs)) if jobs else set()
    return [" ".join(_short(o) for o in j.overrides if o not in common) or f"job {j.job}" for j in jobs]


def _short(override: str) -> str:
    """`optimizer.lr=0.0021107211086166433` -> `optimizer.lr=0.00211` (a sampler's values, in a legend)."""
    key, sep, value = override.partition("=")
    try:
        number = float(value)
    except ValueError:
        return override
    return f"{key}{sep}{number:.3g}" if sep and len(value) > 8 else override


def plot(jobs: Sequence[JobSummary], title: str) -> bytes:
    """summary.png: train loss (thin) and eval loss (markers) of every job on one plot."""
    import matplotlib
    matplotlib.use("Agg")                  # files only; never a window, also without a display
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=100)
    axes = figure.add_subplot()
    for job, label, color in zip(jobs, _labels(jobs), _colors(len(jobs))):
        suffix = "" if job.status == "COMPLETED" else f" ({job.status.lower()})"
        if job.curve:
            steps, losses = zip(*job.curve)
            axes.plot(steps, losses, color=color, linewidth=0.8, alpha=0.5)
        if job.eval_curve:
            steps, losses = zip(*job.eval_curve)
            axes.plot(steps, losses, color=color, marker="o", linewidth=1.8, label=f"{label}{suffix}")
        elif job.curve:
            axes.plot([], [], color=color, label=f"{label}{suffix}")
        else:
            axes.plot([], [], color=color, linestyle="none", label=f"{label}{suffix}: no metrics")
    axes.set(xlabel="step", ylabel="loss (thin: train, markers: eval)", title=f"sweep {title}")
    losses = [loss for job in jobs for _, loss in job.curve + job.eval_curve if loss > 0]
    if losses and max(losses) > 10 * min(losses):      # early losses dwarf the rest: a log axis shows both
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter("{x:g}")
        axes.yaxis.set_minor_formatter("{x:g}")
    axes.grid(alpha=0.3)
    if jobs:
        axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmtrain summarize",
                                     description="Rebuild summary.csv, summary.md and summary.png of a sweep directory "
                                                 "from what its jobs left on disk.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir}: no such directory")
    jobs = rebuild(args.sweep_dir)
    if not jobs:
        print(f"{args.sweep_dir}: no job directories (expected <job>/.hydra/overrides.yaml or <job>/result.json)")
        return 1
    print((args.sweep_dir / "summary.md").read_text(), end="")
    print(f"\nwrote {args.sweep_dir}/summary.csv, summary.md, summary.png")
    return 0
