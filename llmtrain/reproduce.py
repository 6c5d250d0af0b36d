"""`llmtrain reproduce <run dir> [key=value ...]`: re-run a finished run and check that it matches.

The run is rebuilt from its resolved snapshot (`resolved_config.yaml`: every value as used, no
interpolation left to re-evaluate), not from today's conf/ files, in a new directory, with the
thread count and working directory the original recorded. Then metrics.jsonl is compared row by
row, every key except wall-clock timings; on CPU a match is bit-exact. The command names the first
differing step and key otherwise, and warns about what can explain a difference before it starts: a
different git commit, a dirty tree (then or now), other package versions or another device.

Overrides after the run directory change the snapshot's values (e.g. `optimizer.lr=1e-3`) and so
show where a change first shows up in the metrics.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.config
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TIMING_KEYS = ("tokens_per_s", "elapsed_s")   # wall-clock: never equal between two runs
log = logging.getLogger("llmtrain.reproduce")


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b and type(a) is type(b)


def first_difference(original: Sequence[dict[str, Any]], again: Sequence[dict[str, Any]],
                     ignore: Sequence[str] = TIMING_KEYS) -> str | None:
    """None when both metric logs agree on every row and non-timing key, else the first difference."""
    for index, (a, b) in enumerate(zip(original, again)):
        step = a.get("step", index + 1)
        if a.get("step") != b.get("step"):
            return f"row {index + 1}: step {a.get('step')} in the original, {b.get('step')} in the reproduction"
        for key in sorted((set(a) | set(b)) - set(ignore)):
            if key not in a or key not in b:
                where = "original" if key in a else "reproduction"
                return f"step {step}: key {key!r} only in the {where}"
            if not _same(a[key], b[key]):
                return f"step {step}: {key} = {a[key]!r} in the original, {b[key]!r} in the reproduction"
    if len(original) != len(again):
        return (f"the original has {len(original)} metric rows, the reproduction {len(again)} "
                f"(the first {min(len(original), len(again))} agree)")
    return None


def provenance_warnings(record: dict[str, Any]) -> list[str]:
    """What differs between the original run's environment and this one."""
    from llmtrain.rundir import git_state, package_versions
    warnings = []
    then = record.get("git") or {}
    now = git_state(Path(__file__).parent)
    if then.get("commit") and now.get("commit") and then["commit"] != now["commit"]:
        warnings.append(f"the run was made at git commit {then['commit'][:12]}, the code now is at "
                        f"{now['commit'][:12]}: a difference may come from the code")
    if then.get("dirty"):
        warnings.append("the run was made from a dirty tree (uncommitted changes): its exact code is unknown")
    if now.get("dirty"):
        warnings.append("the tree now has uncommitted changes")
    versions_then, versions_now = record.get("versions") or {}, package_versions()
    for name in ("python", "torch", "llmtrain", "numpy"):
        if versions_then.get(name) and versions_then.get(name) != versions_now.get(name):
            warnings.append(f"{name} {versions_then[name]} then, {versions_now.get(name)} now")
    return warnings


def resumed_changes(run_dir: Path, cfg: Any) -> list[str]:
    """A warning when the run was resumed with changed values (e.g. a longer trainer.max_steps).

    The snapshot holds the values the run started with; the last checkpoint holds those it ended
    with. A straight re-run of the snapshot cannot follow a change made halfway.
    """
    from omegaconf import OmegaConf
    final = run_dir / "checkpoints" / "latest" / "config.yaml"
    if not final.is_file():
        return []
    from llmtrain.rundir import relocate
    ended_cfg = OmegaConf.create(final.read_text())   # a moved run's paths: compared from the same place
    ended_cfg = relocate(ended_cfg, str(ended_cfg.paths.output_dir), str(cfg.paths.output_dir))
    ended = _flatten(OmegaConf.to_container(ended_cfg))
    started = _flatten(OmegaConf.to_container(cfg))
    changed = sorted(key for key in started.keys() | ended.keys()
                     if key != "resume" and started.get(key) != ended.get(key))
    if not changed:
        return []
    return [f"the run was resumed with changed values ({', '.join(changed[:5])}"
            f"{', ...' if len(changed) > 5 else ''}): a straight re-run of its snapshot follows the starting values"]


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def configure_logging(output_dir: Path) -> None:
    """The run's usual logging (rich console + train.log in its directory), without Hydra."""
    from omegaconf import OmegaConf
    spec = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "hydra" / "job_logging" / "rich.yaml")
    spec.handlers.file.filename = str(output_dir / "train.log")
    logging.config.dictConfig(OmegaConf.to_container(spec, resolve=True))


def reproduce(run_dir: Path, overrides: Sequence[str] = (), out: Path | None = None) -> dict[str, Any]:
    """Re-run `run_dir` from its snapshot into a new directory; returns the report (also reproduce.json)."""
    import torch
    from omegaconf import OmegaConf

    from llmtrain.entry import train
    from llmtrain.rundir import claim_new_dir, relocate

    snapshot, record_path = run_dir / "resolved_config.yaml", run_dir / "run.json"
    if not snapshot.is_file():
        raise ValueError(f"{run_dir}: no resolved_config.yaml; is this a run directory (outputs/<date>/<time>)?")
    if not (run_dir / "metrics.jsonl").is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl to compare with (callbacks.metrics was off?)")
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("status") != "completed":
        raise ValueError(f"{run_dir}: run.json says status {record.get('status')!r}; reproduce a completed run "
                         f"(continue an unfinished one with `python run.py resume={run_dir}`)")
    cfg = OmegaConf.load(snapshot)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or OmegaConf.select(cfg, key, default="<missing>") == "<missing>":
            raise ValueError(f"override {override!r}: expected key=value with a key of {snapshot}")
        OmegaConf.update(cfg, key, OmegaConf.select(OmegaConf.from_dotlist([override]), key), merge=False)
    output_dir = Path(out) if out is not None else Path(claim_new_dir(run_dir.with_name(f"{run_dir.name}.reproduce")))
    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = relocate(cfg, str(cfg.paths.output_dir), str(output_dir))
    cfg.resume = None

    configure_logging(output_dir)
    warnings = provenance_warnings(record) + resumed_changes(run_dir, cfg)
    if record.get("threads") and record["threads"] != torch.get_num_threads():
        torch.set_num_threads(record["threads"])
        log.info("torch threads: %d, as the original run recorded", record["threads"])
    if record.get("cwd") and Path(record["cwd"]).is_dir():
        os.chdir(record["cwd"])       # relative paths in the snapshot (data files, init_from) meant this directory
    elif record.get("cwd"):
        warnings.append(f"the original working directory {record['cwd']} is gone: relative paths resolve "
                        f"against {os.getcwd()}")
    for warning in warnings:
        log.warning(warning)
    log.info("reproducing %s in %s%s", run_dir, output_dir,
             f" with {' '.join(overrides)}" if overrides else "")

    train(cfg)
    difference = first_difference(read_rows(run_dir / "metrics.jsonl"), read_rows(output_dir / "metrics.jsonl"))
    weights = [d / "checkpoints" / "latest" / "model.safetensors" for d in (run_dir, output_dir)]
    same_weights = (weights[0].read_bytes() == weights[1].read_bytes()) if all(w.is_file() for w in weights) else None
    report = {"original": str(run_dir), "reproduction": str(output_dir), "overrides": list(overrides),
              "match": difference is None, "first_difference": difference,
              "final_weights_identical": same_weights, "warnings": warnings}
    (output_dir / "reproduce.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmtrain reproduce",
        description="Re-run a finished run from its resolved snapshot in a new directory and check that "
                    "metrics.jsonl matches (bit-exact on CPU). Exit 0 on a match, 1 otherwise.")
    parser.add_argument("run_dir", type=Path, help="a finished run's directory (holds resolved_config.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value changes to the snapshot (to see their effect)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory of the reproduction (default: <run dir>.reproduce, then _2, _3, ...)")
    args = parser.parse_args(argv)
    try:
        report = reproduce(args.run_dir.resolve(), args.overrides, args.out)
    except ValueError as error:
        print(f"llmtrain reproduce: {error}", file=sys.stderr)
        return 2
    if report["match"]:
        weights = {True: "; final weights byte-identical", False: "; final weights differ", None: ""}
        log.info("MATCH: every metric of every step equals the original's (timings aside)%s",
                 weights[report["final_weights_identical"]])
    else:
        log.error("DIFFERENT: %s", report["first_difference"])
    log.info("report: %s", Path(report["reproduction"]) / "reproduce.json")
    return 0 if report["match"] else 1
