"""Post-training through the real CLI: SFT and DPO runs, and the pre-train -> SFT -> DPO chain."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from tests.e2e.test_cli import SMOKE, rows, run_cli

DPO_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"}


def test_pretrain_then_sft_then_dpo_each_start_from_the_last_and_record_it(tmp_path):
    pre, sft, dpo = tmp_path / "pre", tmp_path / "sft", tmp_path / "dpo"
    stages = [(pre, ["model=mla"]), (sft, ["strategy=sft", f"model.init_from={pre}"]),
              (dpo, ["strategy=dpo", f"model.init_from={sft}", "strategy.precompute_reference=true",
                     "data.n_train=1000", "data.n_eval=100"])]     # precompute scores every pair once
    for run_dir, overrides in stages:
        result = run_cli(*SMOKE, *overrides, f"hydra.run.dir={run_dir}")
        assert result.returncode == 0, result.stderr[-3000:]

    sft_rows = rows(sft)
    assert {"ppl", "response_tokens", "eval/ppl", "eval/accuracy"} <= set(sft_rows[-1])
    assert all(row["response_tokens"] > 0 for row in sft_rows)
    dpo_rows = rows(dpo)
    assert DPO_KEYS <= set(dpo_rows[0]) and {f"eval/{k}" for k in DPO_KEYS} <= set(dpo_rows[-1])
    assert dpo_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)     # policy == reference at step 1
    assert dpo_rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert "held-out preference accuracy" in (dpo / "train.log").read_text()

    lineage = json.loads((dpo / "run.json").read_text())["init_from"]
    assert lineage["strategy"] == "llmtrain.strategies.sft.SFT" and lineage["step"] == 8
    assert lineage["checkpoint"].startswith(str(sft.resolve()))
    assert lineage["init_from"]["strategy"] == "llmtrain.strategies.seq.NextToken"
    assert json.loads((pre / "run.json").read_text())["init_from"] is None
    for run_dir in (sft, dpo):    # the architecture came from the pre-trained run, not from model=gqa
        assert OmegaConf.load(run_dir / "resolved_config.yaml").model.attention._target_.endswith("MLAttention")


def test_a_run_directory_that_holds_a_run_is_not_overwritten(tmp_path):
    assert run_cli(*SMOKE, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}").returncode == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    result = run_cli(*SMOKE, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and f"{tmp_path} already holds a run" in result.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_dpo_on_text_data_fails_at_start_naming_both(tmp_path):
    (tmp_path / "corpus.txt").write_text("some text " * 100)
    result = run_cli(*SMOKE, "strategy=dpo", "data=text", "data.paths=[corpus.txt]", cwd=tmp_path)
    assert result.returncode != 0
    assert "the strategy consumes 'preference' batches, but data=text" in result.stderr


@pytest.mark.parametrize("precompute", [False, True], ids=["online-reference", "precomputed-reference"])
def test_dpo_resume_continues_with_the_same_reference_bit_exactly(precompute, tmp_path):
    """The reference is the *starting* policy: a resumed run must not copy the resumed weights."""
    from safetensors.torch import load_file

    from llmtrain.entry import train
    from tests.conftest import SMOKE as IN_PROCESS, compose_cfg

    common = [*IN_PROCESS, "strategy=dpo", f"strategy.precompute_reference={str(precompute).lower()}",
              "data.n_train=400", "data.n_eval=40", "data.accuracy_examples=0", "callbacks.checkpoint.every_steps=4"]
    train(compose_cfg(*common, f"paths.output_dir={tmp_path / 'straight'}"))
    with pytest.raises(KeyboardInterrupt):     # stopped at step 6; resumed from the step-4 checkpoint
        train(compose_cfg(*common, "+callbacks.stop={_target_:tests.e2e.interrupt.InterruptAt,step:6}",
                          f"paths.output_dir={tmp_path / 'split'}"))
    train(compose_cfg(*common, f"resume={tmp_path / 'split'}", "+callbacks.stop=null",
                      f"paths.output_dir={tmp_path / 'split'}"))
    straight, split = rows(tmp_path / "straight"), rows(tmp_path / "split")
    drop = ("tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in straight] == \
        [{k: v for k, v in r.items() if k not in drop} for r in split]
    a = load_file(tmp_path / "straight/checkpoints/latest/model.safetensors")
    b = load_file(tmp_path / "split/checkpoints/latest/model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
