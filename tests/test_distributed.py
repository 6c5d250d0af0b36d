"""DDP and FSDP2 on CPU (gloo, 2 ranks) through the real CLI: 2 ranks x batch B train exactly like
1 process x batch 2B, resume under 2 ranks is bit-exact, and sweeps start their ranks per job."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule

from llmtrain.callbacks.base import Callback
from tests.conftest import REPO
from tests.e2e.test_cli import rows, run_cli

SMALL = ["debug=smoke", "data.n_train=2000", "data.n_eval=64", "data.accuracy_examples=8", "~callbacks.progress"]
TWO_RANKS = ["hardware.nprocs=2", "data.batch_size=4"]


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in rows(run_dir)]


def assert_same_curve(a: Path, b: Path) -> None:
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 8
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5, (la, lb)
    assert abs(rows(a)[-1]["eval/loss"] - rows(b)[-1]["eval/loss"]) < 1e-5


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process with the global batch, 2 x 4 = 8 rows."""
    run_dir = tmp_path_factory.mktemp("single")
    result = run_cli(*SMALL, "hardware=cpu", "data.batch_size=8", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "fsdp hardware.reshard_after_forward=false"])
def test_two_ranks_train_like_one_process_with_twice_the_batch(engine, one_process, tmp_path):
    """FSDP2 with reshard_after_forward=false (ZeRO-2) too: its gathered weights must not outlive the
    warm-up forward, or no gradient reaches the shards."""
    result = run_cli(*SMALL, f"hardware={engine.split()[0]}", *engine.split()[1:], *TWO_RANKS,
                     f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert_same_curve(tmp_path, one_process)
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "completed"
    assert not list(tmp_path.glob("*rank*"))                    # rank 0 alone writes files


def test_torchrun_ranks_share_one_run_directory(one_process, tmp_path):
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(REPO / "run.py"),
                             *SMALL, "hardware=ddp", "data.batch_size=4", f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert_same_curve(tmp_path, one_process)
    assert (tmp_path / ".hydra/config.yaml").exists() and (tmp_path / "train.log").exists()


RESUME = [*SMALL, "hardware=fsdp", *TWO_RANKS, "trainer.max_steps=12", "callbacks.checkpoint.every_steps=4"]


@pytest.mark.slow        # ~35 s: three 2-rank runs
def test_fsdp_resume_under_two_ranks_is_bit_exact_and_loads_into_one_process(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_cli(*RESUME, f"hydra.run.dir={straight}").returncode == 0
    stopped = run_cli(*RESUME, "+callbacks.stop={_target_:tests.e2e.interrupt.SignalAt,step:6}",
                      f"hydra.run.dir={split}")
    assert stopped.returncode == 143, stopped.stderr           # SIGTERM: checkpointed at step 6 on both ranks
    assert (split / "checkpoints/latest").resolve().name == "step_000006"
    resumed = run_cli(f"resume={split}", "+callbacks.stop=null")
    assert resumed.returncode == 0, resumed.stderr
    final = "checkpoints/latest/model.safetensors"
    assert (straight / final).read_bytes() == (split / final).read_bytes()
    assert losses(straight) == losses(split)
    single = run_cli(f"resume={straight}", "hardware=cpu", "trainer.max_steps=14")   # full state: one process
    assert single.returncode == 0, single.stderr
    assert rows(straight)[-1]["step"] == 14


@pytest.mark.slow        # ~20 s: two jobs of 2 ranks
def test_a_sweep_starts_the_ranks_of_each_job_in_its_own_directory(tmp_path):
    result = run_cli("-m", "optimizer.lr=1e-4,3e-4", "hardware=ddp", *TWO_RANKS, *SMALL,
                     f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    for job in ("0", "1"):
        assert json.loads((tmp_path / job / "result.json").read_text())["status"] == "COMPLETED"
        assert len(rows(tmp_path / job)) == 8
    assert losses(tmp_path / "0") != losses(tmp_path / "1")


def held_fraction(module: torch.nn.Module) -> float:
    """The share of an FSDP2 module's parameter numbers this rank holds (DTensor.numel is the full size)."""
    held = sum(p.to_local().numel() for p in module.parameters())
    return held / sum(p.numel() for p in module.parameters())


class ReferenceFollowsPolicy(Callback):
    """With strategy.sync_interval=1, each step's reference must be the policy as the step before left it
    (with sync_alpha = α < 1: α of it plus 1 - α of the reference before); under FSDP2 the reference is
    sharded as the policy is (each rank holds about half of it)."""

    def __init__(self) -> None:
        self.previous: dict[str, torch.Tensor] | None = None
        self.previous_reference: dict[str, torch.Tensor] | None = None
        self.checks = 0

    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        full = StateDictOptions(full_state_dict=True)
        policy = get_model_state_dict(trainer.model, options=full)       # collectives under FSDP2
        frozen = trainer.strategy.reference.model
        reference = get_model_state_dict(frozen, options=full)
        assert isinstance(frozen, FSDPModule) == isinstance(trainer.model, FSDPModule)
        if isinstance(frozen, FSDPModule):
            assert held_fraction(frozen) < 0.6
        alpha = trainer.strategy.sync_alpha
        if self.previous is not None:
            for name in reference:
                want = self.previous[name] if alpha == 1 else \
                    alpha * self.previous[name] + (1 - alpha) * self.previous_reference[name]
                torch.testing.assert_close(reference[name], want, atol=0 if alpha == 1 else 1e-6,
                                           rtol=0 if alpha == 1 else 1e-6, msg=f"sync missed {name}")
            assert not all(torch.equal(reference[name], policy[name]) for name in reference)   # weight decay moved it
            self.checks += 1
        self.previous = {name: tensor.clone() for name, tensor in policy.items()}
        self.previous_reference = {name: tensor.clone() for name, tensor in reference.items()}

    def on_train_end(self, trainer) -> None:
        assert self.checks == trainer.step - 1 > 0, self.checks


@pytest.mark.parametrize("engine, thinking", [("ddp", "none"), ("fsdp", "hrpo")])
def test_grpo_trains_under_two_ranks(engine, thinking, tmp_path):
    """A GRPO run's first forward is a rollout under inference mode: neither engine may keep the
    buffers it makes there (DDP's gradient buckets, FSDP2's all-gather buffers) for backward. Every
    step also copies the policy into the reference (under FSDP2 shard by shard), and HRPO's
    decode reads the embedding outside forward, where FSDP2 holds only this rank's shard. Under DDP
    the advantages use the batch std, all-reduced over the two ranks (scale_rewards=batch); under FSDP2
    each sync is a soft one (sync_alpha=0.5), computed shard by shard."""
    scaling = ["strategy.scale_rewards=batch"] if engine == "ddp" else ["strategy.sync_alpha=0.5"]
    result = run_cli("strategy=grpo", "debug=smoke", "data.n_eval=16", "data.accuracy_examples=8", f"hardware={engine}",
                     f"model/thinking={thinking}", "hardware.nprocs=2", "trainer.max_steps=3", *scaling,
                     "strategy.sync_interval=1", "~callbacks.progress", f"hydra.run.dir={tmp_path}",
                     "+callbacks.reference={_target_:tests.test_distributed.ReferenceFollowsPolicy}")
    assert result.returncode == 0, result.stderr
    train = [row for row in rows(tmp_path) if "loss" in row and "reward" in row]
    assert len(train) == 3 and all(row["loss"] == row["loss"] for row in train)    # three finite steps


def test_grpo_resumes_mid_cycle_under_two_ranks_with_each_ranks_buffered_rollouts(tmp_path):
    """With num_iterations=2 step 3 reuses the rollouts of step 2, which differ by rank (each rank samples
    its own prompts); a checkpoint at step 3 holds both ranks' (gathered), and each takes back its own.
    Under FSDP2 the checkpoint's reference (synced at step 2) is gathered from its shards, and resharded
    on resume."""
    from safetensors.torch import load_file

    common = ["strategy=grpo", "debug=smoke", "data.n_eval=8", "data.accuracy_examples=0", "hardware=fsdp",
              "hardware.nprocs=2", "scheduler=constant", "strategy.num_iterations=2", "strategy.sync_interval=2",
              "strategy.rewards=[{_target_:tests.strategies.test_grpo.distinct_chars,_partial_:true}]",   # varies
              "callbacks.checkpoint.every_steps=1", "callbacks.checkpoint.keep_last=9", "~callbacks.progress"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for args in ([f"hydra.run.dir={straight}", "trainer.max_steps=5"], [f"hydra.run.dir={split}", "trainer.max_steps=3"],
                 [f"hydra.run.dir={split}", "trainer.max_steps=5", f"resume={split}"]):
        result = run_cli(*common, *args)
        assert result.returncode == 0, result.stderr
    kept = load_file(split / "checkpoints/step_000003/strategy.safetensors")
    assert {k.split("/")[1] for k in kept if k.startswith("buffer/")} == {"0", "1"}
    weights = load_file(split / "checkpoints/step_000003/model.safetensors")
    reference = {k[len("reference/"):]: v for k, v in kept.items() if k.startswith("reference/")}
    assert {k: v.shape for k, v in reference.items()} == {k: v.shape for k, v in weights.items()}   # full, not a shard
    def training(run: Path) -> list[dict]:       # the first split run also evaluated at its end (step 3)
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s") and not k.startswith("eval/")}
                for r in rows(run)]

    assert training(straight) == training(split) and len(training(split)) == 5
    assert all(row["grad_norm"] > 0 for row in training(split)) and training(split)[3]["kl"] > 0   # row 4: the reference of step 2, from the checkpoint
    a, b = (load_file(run / "checkpoints/latest/model.safetensors") for run in (straight, split))
    assert all(torch.equal(a[name], b[name]) for name in a)


class ReferenceIsSharded(Callback):
    def on_step_end(self, trainer, metrics: dict[str, float]) -> None:
        frozen = trainer.strategy.reference.model
        assert isinstance(frozen, FSDPModule) and held_fraction(frozen) < 0.6


def test_dpo_under_fsdp_shards_the_reference_and_trains_like_one_process(tmp_path):
    """The reference's forward gathers its shards block by block: 2 ranks x 4 pairs give the loss curve
    of 1 process x 8 pairs, from ln 2 at the first step (policy == reference)."""
    dpo = ["strategy=dpo", "debug=smoke", "trainer.max_steps=4", "data.n_eval=16", "~callbacks.progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    for args in (["hardware=cpu", "data.batch_size=8", f"hydra.run.dir={one}"],
                 ["hardware=fsdp", *TWO_RANKS, f"hydra.run.dir={two}",
                  "+callbacks.sharded={_target_:tests.test_distributed.ReferenceIsSharded}"]):
        result = run_cli(*dpo, *args)
        assert result.returncode == 0, result.stderr
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) == 4 and abs(la[0] - math.log(2)) < 1e-6
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5, (la, lb)
