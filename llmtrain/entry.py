"""train(cfg): build every object from its own config node, in dependency order, then fit.

Nothing below receives `cfg`: each object gets its node's keyword arguments, and objects that
need other objects get them as keyword arguments here (STYLE 2.4).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from llmtrain.checkpoint import load_checkpoint
from llmtrain.launch import launch, under_launcher
from llmtrain.pretrained import build, check_tokenizer, load_weights, source_model_node, stage_record
from llmtrain.rundir import RunRecord, find_checkpoint, register_resolvers, relocate, save_resolved_config
from llmtrain.trainer import NonFiniteError, check_settings

log = logging.getLogger(__name__)
register_resolvers()          # conf/hydra/default.yaml needs them before @hydra.main composes


def command_line_overrides() -> list[str]:
    """The task overrides this run was started with (empty outside Hydra)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def resume_config(cfg: DictConfig, checkpoint: Path) -> DictConfig:
    """The config a checkpoint was written with, plus the overrides given now (e.g. a longer max_steps).

    Resuming from the snapshot, not from today's conf/ files, is what makes resume exact. Its paths
    inside the run directory it was written in are moved to the directory resumed now, so that a
    copied or moved run directory goes on in place instead of writing into the original.

    An override that changes the optimizer (optimizer.lr, weight_decay, betas, groups...) is refused:
    the checkpoint's optimizer and scheduler state would restore the old values anyway, while the new
    run's config.yaml recorded the new ones. So is one that changes the model: its weights fit only
    the architecture they were trained with.
    """
    saved = OmegaConf.create((checkpoint / "config.yaml").read_text())
    saved = relocate(saved, str(saved.paths.output_dir), str(cfg.paths.output_dir))
    for override in command_line_overrides():
        key = override.lstrip("+~").split("=", 1)[0]
        if key in ("resume", "paths.output_dir") or key.startswith("hydra."):
            continue
        group, path = _group_of(key), key.replace("/", ".")
        if group in ("optimizer", "model") and not _same(OmegaConf.select(saved, path), OmegaConf.select(cfg, path)):
            kept = ("the optimizer state of {0} (its learning rates, weight decay and moments), so this override "
                    "would not apply" if group == "optimizer" else "the architecture of {0}, which its weights fit")
            raise ValueError(f"{override}: a resumed run keeps {kept.format(checkpoint)}; resume without it, or "
                             f"start a new run from these weights with model.init_from={checkpoint} {override}")
        if override.startswith("~"):
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(saved, parent) if parent else saved
            with open_dict(node):
                node.pop(leaf, None)
        else:
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    saved.resume, saved.paths.output_dir = cfg.resume, cfg.paths.output_dir
    return saved


def _group_of(key: str) -> str:
    """The config group an override key belongs to: optimizer.lr -> optimizer, model/thinking -> model."""
    return key.split("/")[0].split(".")[0]


def _same(a: object, b: object) -> bool:
    """Equal config values, whether plain or OmegaConf nodes (an override may restate the saved value)."""
    plain = [OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for v in (a, b)]
    return plain[0] == plain[1]


def claim_run_dir(output_dir: Path) -> None:
    """Create run.json exclusively: a directory that holds a run, or is being claimed by another
    process at this moment, is refused instead of being written over."""
    try:
        with (output_dir / "run.json").open("x") as record:
            record.write('{"status": "starting"}\n')
    except FileExistsError:
        raise ValueError(f"{output_dir} already holds a run (run.json): continue it with resume={output_dir}, "
                         "or choose another hydra.run.dir / paths.output_dir") from None


@contextlib.contextmanager
def claimed_run_dir(output_dir: Path, claim: bool, keep_if_started: bool = False) -> Iterator[None]:
    """Claim `output_dir` for a new run during the setup inside; if the setup fails (bad input),
    release it again, so that the directory does not look like it holds a run.

    `keep_if_started`: the inside is the whole run in other processes; release only if rank 0 never
    got as far as writing its record (run.json still says "starting").
    """
    if claim:
        claim_run_dir(output_dir)
    try:
        yield
    except BaseException:
        record = output_dir / "run.json"
        if claim and not (keep_if_started and record.exists() and '"starting"' not in record.read_text()):
            record.unlink(missing_ok=True)
        raise


def resume_snapshot() -> Path | None:
    """The `.hydra/resume_<time>/` folder Hydra wrote for this job if it resumes a run, else None."""
    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir", default=None)   # unset under the compose API
    subdir = OmegaConf.select(hydra_cfg, "output_subdir", default=None)
    if output_dir is None or subdir is None or not str(subdir).startswith(".hydra/resume_"):
        return None
    return Path(output_dir) / subdir


@contextlib.contextmanager
def snapshot_dropped_on_error(record: Path | None = None) -> Iterator[None]:
    """A resume refused during its setup (a bad override, a finished run) removes the snapshot Hydra
    wrote for it before the job started: it would describe a resume that never ran.

    `record`: the inside is the whole run in rank processes; drop the snapshot only if this run.json
    is as it was, i.e. rank 0 never got as far as recording the resume (llmtrain.rundir.RunRecord).
    """
    before = record.read_bytes() if record is not None and record.exists() else None
    try:
        yield
    except BaseException:
        snapshot = resume_snapshot()
        unstarted = record is None or (record.read_bytes() if record.exists() else None) == before
        if snapshot is not None and unstarted:
            shutil.rmtree(snapshot, ignore_errors=True)
        raise


class NoRecord:
    """The run record of ranks other than 0: only rank 0 writes run.json."""

    def finish(self, status: str, metrics: dict[str, float] | None, elapsed_s: float) -> None:
        pass


def check_config(cfg: DictConfig) -> None:
    """Fail in the first second on values that are missing (???) or do not resolve."""
    if cfg.paths.output_dir is None:
        raise ValueError("paths.output_dir is not set; outside `python run.py`, pass paths.output_dir=<dir>")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def build_model(cfg: DictConfig, hardware: Any, vocab_size: int) -> Any:
    """Instantiate the model node, taking the vocabulary size from the tokenizer when it is null.

    With `model.init_from=<path>` the architecture comes from the source (an HF folder's
    config.json or a run's config.yaml) and replaces the model group's values in `cfg`, so the
    resolved config records what was actually built; then the source's weights are loaded. Only
    `model.thinking` (HRPO) is this run's: a thinking module absent from the source starts fresh,
    one the run does not ask for is dropped (llmtrain.pretrained.load_weights says which).
    """
    init_from = cfg.model.get("init_from")
    if init_from:
        ignored = [o for o in command_line_overrides() if _group_of(o.lstrip("+~").split("=", 1)[0]) == "model"
                   and not o.lstrip("+~").startswith(("model.init_from=", "model/thinking=", "model.thinking"))]
        if ignored:
            raise ValueError(f"{' '.join(ignored)}: with model.init_from={init_from} the architecture comes from "
                             "there, so these overrides would be ignored; drop them (only model/thinking and "
                             "model.thinking.* are this run's own)")
        check_tokenizer(init_from, cfg.data.tokenizer)     # before the source's architecture replaces ours
        node = source_model_node(init_from)
        node.init_from, node.thinking = init_from, cfg.model.get("thinking")
        log.info("model.init_from=%s: the architecture and weights come from there", init_from)
        cfg.model = node
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = vocab_size
    elif cfg.model.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                         f"vocabulary ({vocab_size} tokens)")
    with hardware.init_device():
        model = build(cfg.model)
    if init_from:
        load_weights(model, init_from)
    n = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %s parameters (%.2fM), vocab %d", type(model).__name__, f"{n:,}", n / 1e6,
             cfg.model.vocab_size)
    return hardware.place(model)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Run one training job described by `cfg`: in this process, or in `hardware.nprocs` rank
    processes started here (llmtrain.launch), or as one rank of a torchrun / SLURM job.

    Returns:
        The final metrics, and the built objects (model, trainer, callbacks, ...) for tests (only
        `cfg` when the ranks ran in other processes).
    """
    with snapshot_dropped_on_error():
        checkpoint = None if cfg.resume is None else find_checkpoint(cfg.resume)
        if checkpoint is not None:
            cfg = resume_config(cfg, checkpoint)
        check_config(cfg)
        nprocs = cfg.hardware.get("nprocs")
        if nprocs is not None and nprocs < 1:
            raise ValueError(f"hardware.nprocs={nprocs} must be >= 1 (the number of rank processes to start)")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if nprocs is not None and not under_launcher():
        _pin_wandb_group(cfg)
        with claimed_run_dir(output_dir, claim=checkpoint is None, keep_if_started=True), \
                snapshot_dropped_on_error(record=output_dir / "run.json"):
            return launch(cfg, checkpoint, nprocs), {"cfg": cfg}
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not _is_distributed(cfg.hardware):
        raise ValueError(f"this process is one of {world_size} ranks (WORLD_SIZE={world_size}, e.g. torchrun), but "
                         f"hardware._target_={cfg.hardware.get('_target_')} runs one process alone: every rank would "
                         "train the whole run into the same directory. Add hardware=ddp or hardware=fsdp")
    if nprocs is not None and nprocs > 1:
        raise ValueError(f"hardware.nprocs={nprocs} starts rank processes itself; under torchrun (or SLURM) "
                         "leave it at 1: the launcher already started the ranks")
    return run(cfg, checkpoint, claim=checkpoint is None and int(os.environ.get("RANK", "0")) == 0)


def _pin_wandb_group(cfg: DictConfig) -> None:
    """The rank processes rebuild the config without Hydra, so a W&B group left null (the sweep
    directory in a multirun) is filled in here, where Hydra still knows the sweep."""
    from llmtrain.callbacks.wandb import hydra_sweep_group
    node = OmegaConf.select(cfg, "callbacks.wandb")
    if node is not None and "group" in node and node.group is None and (group := hydra_sweep_group()):
        node.group = group


def _is_distributed(node: DictConfig) -> bool:
    """Whether the hardware node builds a multi-process `llmtrain.distributed.Distributed`."""
    from hydra.utils import get_class

    from llmtrain.distributed import Distributed
    try:
        return issubclass(get_class(node._target_), Distributed)
    except Exception:                # not a class (a factory function): it decides for itself
        return True


def check_lengths(cfg: DictConfig, model: Any, strategy: Any) -> None:
    """Refuse, before any data is read, rows or completions longer than the model's RoPE table
    (which a run would otherwise meet at its first long batch); warn where only a long prompt
    plus a full completion would not fit."""
    limit = getattr(getattr(model, "rope", None), "max_seq_len", None)
    seq_len, new_tokens = OmegaConf.select(cfg, "data.seq_len"), getattr(strategy, "max_new_tokens", 0)
    if limit is None:
        return
    if seq_len is not None and seq_len > limit:
        raise ValueError(f"data.seq_len={seq_len} is longer than the model's max_seq_len={limit} (its RoPE table): "
                         f"lower data.seq_len or raise model.max_seq_len")
    if new_tokens >= limit:
        raise ValueError(f"strategy.max_new_tokens={new_tokens} leaves no room for a prompt in the model's "
                         f"max_seq_len={limit}: lower it or raise model.max_seq_len")
    if seq_len is not None and new_tokens and seq_len + new_tokens > limit:
        log.warning("a prompt of data.seq_len=%d tokens plus strategy.max_new_tokens=%d exceeds the model's "
                    "max_seq_len=%d: a rollout of such a prompt would fail", seq_len, new_tokens, limit)


def check_optimizer_and_scheduler(cfg: DictConfig, model: Any) -> None:
    """Build the optimizer and the scheduler once on the unwrapped model, to throw them away: their
    bad values (betas, groups, min_rate...) fail here, before the data and a DPO reference are
    scored. The scheduler sees `trainer.max_steps` (or 1), and its warnings wait for the real one;
    the optimizer's (a group pattern that matches nothing) come from here, and the real one is quiet."""
    optimizer = instantiate(cfg.optimizer)(model.named_parameters())
    with quiet("llmtrain.schedulers"):
        instantiate(cfg.scheduler)(optimizer, total_steps=OmegaConf.select(cfg, "trainer.max_steps") or 1)


def check_trainer(cfg: DictConfig) -> None:
    """The trainer.* values the Trainer would refuse, refused before the data is set up (it needs the data)."""
    known = inspect.signature(check_settings).parameters
    check_settings(**{k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items() if k in known})


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Only errors from `logger` inside: an object built twice warns once."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def run(cfg: DictConfig, checkpoint: Path | None, claim: bool) -> tuple[dict[str, float], dict[str, Any]]:
    """Build everything in dependency order and fit (on every rank); `claim`: take the run directory."""
    output_dir = Path(cfg.paths.output_dir)
    with claimed_run_dir(output_dir, claim=claim), snapshot_dropped_on_error():   # a directory in use fails here, first
        hardware = instantiate(cfg.hardware)
        data = hardware.shard(instantiate(cfg.data))   # cheap: the heavy work is in data.setup
        model = build_model(cfg, hardware, data.tokenizer.vocab_size)
        strategy = instantiate(cfg.strategy)
        check_lengths(cfg, model, strategy)
        callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values() if node is not None]
        check_optimizer_and_scheduler(cfg, model)      # bad values fail before the slow setups below
        check_trainer(cfg)
        data.setup(strategy.format)                    # an impossible pairing fails here, naming both
        with hardware.autocast():                      # DPO's precomputed reference: as the loss scores the policy
            strategy.setup(model, data)                # the plain model (DPO copies it); before a resume
        model = hardware.prepare(model)                # checkpointing, compile, DDP/FSDP: in place
        for frozen in getattr(strategy, "frozen_models", list)():
            hardware.prepare_frozen(frozen)            # a reference: FSDP2 shards it too
        with quiet("llmtrain.optim"):                  # its warnings came from the probe
            optimizer = instantiate(cfg.optimizer)(model.named_parameters())   # FSDP2: of the sharded parameters
        make_scheduler = instantiate(cfg.scheduler)
        callbacks = [c for c in callbacks if hardware.is_rank0 or not c.rank_zero_only]
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        trainer = instantiate(cfg.trainer, model=model, strategy=strategy, data=data, optimizer=optimizer,
                              scheduler=make_scheduler, hardware=hardware, callbacks=callbacks,
                              config_yaml=config_yaml)
        if checkpoint is not None:
            load_checkpoint(checkpoint, trainer)
            if trainer.done:
                raise ValueError(f"resume={cfg.resume}: the run already finished its {trainer.total_steps} steps; "
                                 "add trainer.max_steps=<more> to train further")
            log.info("resumed from %s at step %d", checkpoint, trainer.step)
        elif hardware.is_rank0:
            save_resolved_config(cfg, output_dir)
        init_from = cfg.model.get("init_from")
        record = RunRecord(output_dir, cfg.seed, str(hardware.device), None if checkpoint is None else str(checkpoint),
                           stage_record(init_from) if init_from else None) if hardware.is_rank0 else NoRecord()
    log.info("%s; %d steps of %d micro-batch(es); run directory %s", hardware, trainer.total_steps,
             trainer.accumulation_steps, output_dir)

    start = time.perf_counter()
    try:
        with graceful_stop(trainer):
            metrics = trainer.fit()
    except BaseException as error:
        record.finish(run_status(error), None, time.perf_counter() - start)
        raise
    record.finish("completed", metrics, time.perf_counter() - start)
    log_summary(metrics, output_dir)
    return metrics, {"model": model, "trainer": trainer, "callbacks": callbacks, "data": data,
                     "strategy": strategy, "hardware": hardware, "cfg": cfg}


def run_status(error: BaseException) -> str:
    """run.json's status for a run that ended with `error`: a stop (checkpointed) or a failure."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"                       # SIGTERM / Ctrl-C (StopRequested) included
    return "stopped_nonfinite" if isinstance(error, NonFiniteError) else "failed"


@contextlib.contextmanager
def graceful_stop(trainer: Any) -> Iterator[None]:
    """SIGTERM and a first Ctrl-C finish the current step, checkpoint and stop (exit non-zero).

    A second Ctrl-C aborts at once (KeyboardInterrupt, no checkpoint). Handlers that the parent
    process set to "ignore" (e.g. SIGINT of a background job) stay ignored.
    """
    def on_signal(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if trainer.stop_reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning("%s: stopping after step %d with a checkpoint (Ctrl-C again to abort at once)",
                    name, trainer.step + 1)
        trainer.request_stop(name)

    installable = threading.current_thread() is threading.main_thread()
    previous = {}
    for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        if installable and signal.getsignal(signum) is default:
            previous[signum] = signal.signal(signum, on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def log_summary(metrics: dict[str, float], output_dir: Path) -> None:
    """The closing lines of a run: final losses, held-out accuracy, where everything is."""
    lines = [f"finished at step {metrics.get('step')}: train loss {metrics.get('loss', float('nan')):.4f}"]
    if "eval/loss" in metrics:
        ppl = f" (ppl {metrics['eval/ppl']:.3f})" if "eval/ppl" in metrics else ""
        lines.append(f"eval loss {metrics['eval/loss']:.4f}{ppl}")
    if "eval/rewards/accuracies" in metrics:
        lines.append(f"held-out preference accuracy {metrics['eval/rewards/accuracies']:.1%}, "
                     f"reward margin {metrics['eval/rewards/margins']:.3f}")
    if "eval/reward" in metrics:
        lines.append(f"held-out sampled reward {metrics['eval/reward']:.3f} "
                     f"(within-group std {metrics['eval/reward_std']:.3f})")
    if "eval/accuracy" in metrics:
        per_language = [f"{k.rsplit('/', 1)[1]} {v:.1%}" for k, v in metrics.items() if k.startswith("eval/accuracy/")]
        lines.append(f"held-out accuracy {metrics['eval/accuracy']:.1%}" +
                     (f" ({', '.join(per_language)})" if per_language else ""))
    lines.append(f"run directory {output_dir}")
    for line in lines:
        log.info(line)
