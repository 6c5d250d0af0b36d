"""Post-training through the real CLI: DPO resume, early errors, no run directory reused.

The pre-train -> SFT -> DPO chain itself runs as the README's pipeline block (tests/e2e/test_readme.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.e2e.test_cli import SMOKE, rows, run_cli

DPO_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"}


def straight_and_resumed(common: list[str], tmp_path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl rows (timings dropped) of a straight run and of one stopped at step 6 and resumed
    from its step-4 checkpoint, both in-process with the overrides `common`."""
    from llmtrain.entry import train
    from tests.conftest import compose_cfg

    train(compose_cfg(*common, f"paths.output_dir={tmp_path / 'straight'}"))
    with pytest.raises(KeyboardInterrupt):
        train(compose_cfg(*common, "+callbacks.stop={_target_:tests.e2e.interrupt.InterruptAt,step:6}",
                          f"paths.output_dir={tmp_path / 'split'}"))
    train(compose_cfg(*common, f"resume={tmp_path / 'split'}", "+callbacks.stop=null",
                      f"paths.output_dir={tmp_path / 'split'}"))
    drop = ("tokens_per_s", "elapsed_s")
    return tuple([{k: v for k, v in r.items() if k not in drop} for r in rows(tmp_path / run)]
                 for run in ("straight", "split"))


def test_a_run_directory_that_holds_a_run_is_not_overwritten(tmp_path):
    (tmp_path / "run.json").write_text('{"status": "completed"}')
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    # data.n_train=1 would fail at data setup: the directory check must come first
    result = run_cli(*SMOKE, "trainer.max_steps=2", "data.n_train=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and f"{tmp_path} already holds a run" in result.stderr
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (tmp_path / "run.json").read_text() == '{"status": "completed"}'


def test_dpo_on_text_data_fails_at_start_naming_both(tmp_path):
    (tmp_path / "corpus.txt").write_text("some text " * 100)
    result = run_cli(*SMOKE, "strategy=dpo", "data=text", "data.paths=[corpus.txt]", cwd=tmp_path)
    assert result.returncode != 0
    assert "the strategy consumes 'preference' batches, but data=text" in result.stderr


@pytest.mark.parametrize("precompute", [False, True], ids=["online-reference", "precomputed-reference"])
def test_dpo_resume_continues_with_the_same_reference_bit_exactly(precompute, tmp_path):
    """The reference is the *starting* policy: a resumed run must not copy the resumed weights."""
    from safetensors.torch import load_file

    from tests.conftest import SMOKE as IN_PROCESS

    common = [*IN_PROCESS, "strategy=dpo", f"strategy.precompute_reference={str(precompute).lower()}",
              "data.n_train=400", "data.n_eval=40", "data.accuracy_examples=0", "callbacks.checkpoint.every_steps=4"]
    straight, split = straight_and_resumed(common, tmp_path)
    assert straight == split
    a = load_file(tmp_path / "straight/checkpoints/latest/model.safetensors")
    b = load_file(tmp_path / "split/checkpoints/latest/model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    """The default run directory is claimed with an atomic mkdir: a second claim gets a suffix."""
    from llmtrain.entry import claim_run_dir
    from llmtrain.rundir import claim_new_dir

    base = tmp_path / "outputs" / "16-04-37"
    assert [claim_new_dir(base) for _ in range(3)] == [str(base), f"{base}_2", f"{base}_3"]
    claim_run_dir(base)
    with pytest.raises(ValueError, match="already holds a run"):
        claim_run_dir(base)


def test_a_run_that_fails_at_setup_leaves_its_directory_free(tmp_path):
    from llmtrain.entry import train
    from tests.conftest import SMOKE as IN_PROCESS, compose_cfg

    with pytest.raises(ValueError, match="do not fill one row"):
        train(compose_cfg(*IN_PROCESS, "data.n_train=1", f"paths.output_dir={tmp_path}"))
    assert not (tmp_path / "run.json").exists()
    metrics, _ = train(compose_cfg(*IN_PROCESS, "trainer.max_steps=1", "data.accuracy_examples=0",
                                   f"paths.output_dir={tmp_path}"))
    assert metrics["step"] == 1


GRPO_KEYS = {"reward", "reward_std", "rewards/accuracy", "kl", "completion_length", "clip_ratio"}
GRPO_RUN = ["strategy=grpo", "data.n_train=200", "data.n_eval=8", "data.accuracy_examples=4",
            "strategy.max_new_tokens=6", "trainer.max_steps=4", "trainer.eval_every=2", "trainer.eval_batches=1"]


def test_grpo_through_the_cli_writes_its_metrics(tmp_path):
    result = run_cli(*SMOKE, *GRPO_RUN, "trainer.accumulation_steps=2", "strategy.num_iterations=2",
                     f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    logged = rows(tmp_path)
    assert len(logged) == 4 and all(GRPO_KEYS <= set(row) for row in logged)
    assert {f"eval/{k}" for k in GRPO_KEYS} | {"eval/accuracy"} <= set(logged[-1])
    assert all(0 < row["completion_length"] <= 6 and row["kl"] >= 0 for row in logged)
    assert logged[0]["clip_ratio"] == 0.0                  # a fresh rollout: every ratio is exactly 1
    assert "held-out sampled reward" in (tmp_path / "train.log").read_text()
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert {row["step"] for row in samples} == {2, 4} and len(samples) == 16     # 8 per evaluation
    assert all({"prompt", "completion", "answer"} <= set(row) and set(row["rewards"]) == {"accuracy"}
               for row in samples)


def test_hrpo_through_the_cli_logs_finite_metrics_and_its_thinking_fraction(tmp_path):
    result = run_cli(*SMOKE, "callbacks.progress=null", *GRPO_RUN, "model/thinking=hrpo", "trainer.max_steps=2",
                     "trainer.eval_every=2", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    logged = rows(tmp_path)
    assert len(logged) == 2 and all(GRPO_KEYS | {"thinking_fraction"} <= set(row) for row in logged)
    assert all(math.isfinite(v) for row in logged for v in row.values() if isinstance(v, float))
    assert logged[-1]["eval/thinking_fraction"] > 0.5          # a random model rarely writes "<answer>"


@pytest.mark.parametrize("thinking_option", ["hrpo", "hrpo_proj"])
def test_hrpo_in_process_trains_the_thinking_module_at_its_own_lr(thinking_option, tmp_path, monkeypatch):
    from llmtrain.entry import train
    from llmtrain.generate import Sampler
    from llmtrain.thinking_decode import ThinkingDecoder
    from tests.conftest import SMOKE as IN_PROCESS, compose_cfg

    temperatures, decode = set(), ThinkingDecoder.decode        # which decodes think: rollouts (1.0), eval accuracy (0)
    monkeypatch.setattr(ThinkingDecoder, "decode", lambda self, *args: temperatures.update(
        a.temperature for a in args if isinstance(a, Sampler)) or decode(self, *args))
    metrics, objects = train(compose_cfg(*IN_PROCESS, *GRPO_RUN, f"model/thinking={thinking_option}",
                                         "trainer.max_steps=3", "trainer.eval_every=3", f"paths.output_dir={tmp_path}"))
    assert all(math.isfinite(v) for v in metrics.values()) and metrics["thinking_fraction"] > 0.5
    assert temperatures == {0.0, 1.0} and "eval/accuracy" in metrics
    optimizer = objects["trainer"].optimizer
    lrs = {name: g["initial_lr"] for g in optimizer.param_groups for name in g["names"]}
    thinking = [(n, p) for n, p in objects["model"].named_parameters() if n.startswith("thinking.")]
    assert len(thinking) == (5 if thinking_option == "hrpo" else 7)
    for name, param in thinking:      # conf/optimizer/adamw.yaml's HRPO groups (SPECS 5.5), and every one trained
        assert lrs[name] == next(lr for key, lr in (("gate", 1e-4), ("Lambda", 1e-3), ("projection", 1e-4))
                                 if key in name), name
        assert float(optimizer.state[param]["exp_avg"].abs().sum()) > 0, name


@pytest.fixture(scope="module")
def hrpo_run(tmp_path_factory):
    """A one-step HRPO run directory (its checkpoint has the thinking module)."""
    from llmtrain.entry import train
    from tests.conftest import SMOKE as IN_PROCESS, compose_cfg

    run_dir = tmp_path_factory.mktemp("hrpo") / "run"
    train(compose_cfg(*IN_PROCESS, *GRPO_RUN, "model/thinking=hrpo", "trainer.max_steps=1", "trainer.eval_every=1",
                      f"paths.output_dir={run_dir}"))
    return run_dir


def test_export_of_an_hrpo_checkpoint_is_refused_unless_the_thinking_modules_are_dropped(hrpo_run, tmp_path,
                                                                                         capsys):
    from llmtrain.hf import export

    assert export.main(["hf", str(hrpo_run), str(tmp_path / "hf")]) == 2
    assert "--drop-thinking" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    assert export.main(["hf", str(hrpo_run), str(tmp_path / "hf"), "--drop-thinking"]) == 0
    assert "thinking modules were dropped" in capsys.readouterr().err
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_grpo_on_text_data_fails_at_start_naming_both(tmp_path):
    from llmtrain.entry import train
    from tests.conftest import SMOKE as IN_PROCESS, compose_cfg

    (tmp_path / "corpus.txt").write_text("some text " * 100)
    cfg = compose_cfg(*IN_PROCESS, "strategy=grpo", "data=text", f"data.paths=[{tmp_path / 'corpus.txt'}]",
                      f"paths.output_dir={tmp_path / 'run'}")
    with pytest.raises(ValueError, match="the strategy consumes 'prompts' batches, but data=text"):
        train(cfg)


@pytest.mark.parametrize("every_steps", [4, 5], ids=["aligned-checkpoint", "mid-cycle-checkpoint"])
def test_grpo_resume_is_bit_exact_from_any_step(every_steps, tmp_path):
    """Sampling seeds follow (seed, step, micro-batch). At a step that is a multiple of sync_interval and
    num_iterations the checkpoint holds the reference of the last sync; at step 5 also the rollout of
    step 4 that step 5 reuses."""
    from safetensors.torch import load_file

    from tests.conftest import SMOKE as IN_PROCESS

    common = [*IN_PROCESS, *GRPO_RUN, "trainer.max_steps=8", "trainer.eval_every=4", "strategy.sync_interval=2",
              "strategy.num_iterations=2", f"callbacks.checkpoint.every_steps={every_steps}"]
    straight, split = straight_and_resumed(common, tmp_path)
    assert straight == split and len(straight) == 8 and straight[-1]["kl"] > 0
    a = load_file(tmp_path / "straight/checkpoints/latest/model.safetensors")
    b = load_file(tmp_path / "split/checkpoints/latest/model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)
    kept = load_file(tmp_path / f"split/checkpoints/step_{every_steps:06d}/strategy.safetensors")
    synced = {4: 2, 5: 4}[every_steps]          # the step-4 sync happens before step 4's update, after its save
    assert int(kept["reference_synced_at"]) == synced and any(k.startswith("reference/") for k in kept)
    assert any(k.startswith("buffer/0/") for k in kept)


def test_a_batch_scaled_grpo_run_resumes_bit_exact_mid_cycle(tmp_path):
    """scale_rewards=batch: the window's std is recomputed from the restored rollouts, never stored."""
    from safetensors.torch import load_file

    from tests.conftest import SMOKE as IN_PROCESS

    common = [*IN_PROCESS, *GRPO_RUN, "trainer.max_steps=8", "trainer.accumulation_steps=2", "trainer.eval_every=4",
              "strategy.scale_rewards=batch", "strategy.num_iterations=2", "callbacks.checkpoint.every_steps=5",
              "strategy.rewards=[{_target_:tests.strategies.test_grpo.distinct_chars,_partial_:true}]"]   # varies
    straight, split = straight_and_resumed(common, tmp_path)
    assert straight == split and len(straight) == 8 and "frac_reward_zero_std" in straight[-1]
    kept = load_file(tmp_path / "split/checkpoints/step_000005/strategy.safetensors")
    assert any(k.startswith("buffer/0/1/") for k in kept) and not any("batch_reward_std" in k for k in kept)


def test_a_resume_refuses_an_optimizer_override_it_could_not_apply(tmp_path):
    from llmtrain.entry import train
    from tests.conftest import SMOKE as IN_PROCESS
    from tests.conftest import compose_cfg

    common = [*IN_PROCESS, "trainer.max_steps=2", f"paths.output_dir={tmp_path}"]
    train(compose_cfg(*common))
    with pytest.raises(ValueError, match=r"optimizer.lr=1e-5: a resumed run keeps the optimizer state.*init_from"):
        train(compose_cfg(*common, f"resume={tmp_path}", "trainer.max_steps=3", "optimizer.lr=1e-5"))
    metrics, _ = train(compose_cfg(*common, f"resume={tmp_path}", "trainer.max_steps=3", "optimizer.lr=3e-3"))
    assert len(rows(tmp_path)) == 3                           # restating the saved value is no change


def test_the_fp16_loss_scale_resumes_where_it_was(tmp_path):
    from tests.conftest import SMOKE as IN_PROCESS

    common = [*IN_PROCESS, "hardware.precision=fp16", "data.accuracy_examples=0", "callbacks.checkpoint.every_steps=4",
              "+callbacks.nan={_target_:tests.faults.NaNAt,steps:[2],part:gradients}"]   # one back-off, at step 2
    straight, split = straight_and_resumed(common, tmp_path)
    assert straight == split
    states = [torch.load(tmp_path / run / "checkpoints/latest/resume.pt", weights_only=True)["scaler"]
              for run in ("straight", "split")]
    assert states[0] == states[1] and states[0]["_growth_tracker"] == 6 and states[0]["scale"] == 2.0 ** 15


def test_the_checkpoint_callback_runs_after_the_metrics_and_samples_of_its_step(tmp_path):
    from llmtrain.callbacks.checkpoint import Checkpoint
    from llmtrain.entry import train
    from tests.conftest import SMOKE as IN_PROCESS
    from tests.conftest import compose_cfg

    _, built = train(compose_cfg(*IN_PROCESS, "trainer.max_steps=1", f"paths.output_dir={tmp_path}",
                                 "+callbacks.nan={_target_:tests.faults.NaNAt,steps:[]}"))
    names = [type(c).__name__ for c in built["trainer"].callbacks]
    assert names[-1] == "Checkpoint" and isinstance(built["trainer"].callbacks[-1], Checkpoint)
    assert names.index("JsonlMetrics") < names.index("NaNAt")         # the others keep the config's order


@pytest.mark.parametrize("thinking_option", ["none", "hrpo_proj"])
def test_init_from_takes_the_trunk_and_this_runs_thinking_choice(thinking_option, hrpo_run, tmp_path, caplog):
    """From an HRPO checkpoint: model/thinking=none drops its thinking weights (with a warning); hrpo_proj
    loads the gates and Lambda, and its projection, absent from the source, starts fresh."""
    from safetensors.torch import load_file

    from llmtrain.entry import build_model
    from llmtrain.hardware import Hardware
    from tests.conftest import compose_cfg

    cfg = compose_cfg(f"model/thinking={thinking_option}", f"model.init_from={hrpo_run}",
                      f"paths.output_dir={tmp_path}")
    model = build_model(cfg, Hardware(device="cpu", precision="fp32"), 264)
    source = load_file(hrpo_run / "checkpoints/latest/model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in source.items() if name in state)
    if thinking_option == "none":
        assert model.thinking is None and "its weights are dropped" in caplog.text
    else:
        assert {n for n in state if n.startswith("thinking.")} - set(source) == {
            "thinking.thinking_projection.weight", "thinking.thinking_projection.bias"}


def test_llmtrain_generate_decodes_an_hrpo_checkpoint_with_latent_thinking(hrpo_run, capsys, monkeypatch):
    from llmtrain import generate
    from llmtrain.thinking_decode import ThinkingDecoder

    calls = []
    decode = ThinkingDecoder.decode
    monkeypatch.setattr(ThinkingDecoder, "decode", lambda self, *args: calls.append(self.answer_marker) or
                        decode(self, *args))
    assert generate.main([str(hrpo_run), "--prompt", "1+1=", "--max-new-tokens", "4"]) == 0
    assert calls == ["<answer>"] and capsys.readouterr().out


def test_dapo_with_the_soft_overlong_punishment_and_batch_scaling_through_the_cli(tmp_path):
    """README's DAPO recipe: OverlongPenalty listed in strategy.rewards (its max_length the strategy's
    max_new_tokens), advantages scaled by the window's std."""
    rewards = ("strategy.rewards=[{_target_:llmtrain.strategies.rewards.Accuracy},"
               "{_target_:llmtrain.strategies.rewards.OverlongPenalty,max_length:${strategy.max_new_tokens},"
               "cache_length:4}]")
    dapo = ["strategy=dapo" if arg == "strategy=grpo" else arg for arg in GRPO_RUN]
    result = run_cli(*SMOKE, *dapo, rewards, "strategy.scale_rewards=batch",
                     "trainer.accumulation_steps=2", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    logged = rows(tmp_path)
    assert all({"rewards/accuracy", "rewards/overlong", "frac_reward_zero_std"} <= set(row) for row in logged)
    assert all(-1 <= row["rewards/overlong"] <= 0 and math.isfinite(row["loss"]) for row in logged)
    assert any(row["rewards/overlong"] < 0 for row in logged)       # random weights ramble into the ramp
