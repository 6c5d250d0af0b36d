"""Every combination of group options composes and resolves; every option instantiates."""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf

from llmtrain.data.shards import write_shards
from llmtrain.data.tokenizer import ByteTokenizer
from llmtrain.hf.tokenizer import write_tokenizer_files
from llmtrain.pretrained import build
from tests.conftest import REPO, compose_cfg, group_options

GROUPS = ("model", "model/size", "strategy", "optimizer", "scheduler", "data", "hardware", "callbacks")
MODELS, SIZES = group_options("model"), group_options("model/size")


def attention_of(model: str) -> str:
    """The model/attention option a model file selects (gqa for gqa and moe, mla for mla)."""
    compose_cfg(f"model={model}", "paths.output_dir=unused")
    return HydraConfig.get().runtime.choices["model/attention"]


def family_of(size: str) -> str:
    """The attention a size preset is written for: mla_tiny -> mla; unprefixed presets are GQA's."""
    return size.split("_")[0] if "_" in size else "gqa"


# A size preset sets its attention's own keys (n_kv_heads, kv_lora_rank...), so it fits only
# models with that attention; the other pairs are checked to fail, not left out.
FAMILY = {model: attention_of(model) for model in MODELS}
MODEL_SIZES = [(m, s) for m in MODELS for s in SIZES if family_of(s) == FAMILY[m]]
MISFITS = [(m, s) for m in MODELS for s in SIZES if family_of(s) != FAMILY[m]]
OTHER_OPTIONS = [group_options(g) for g in GROUPS[2:]]
COMBOS = [pair + rest for pair in MODEL_SIZES for rest in itertools.product(*OTHER_OPTIONS)]


def all_pairs(factors: list[list]) -> list[tuple]:
    """Rows in which every pair of values of every two factors occurs at least once (greedy cover).

    The full product grows multiplicatively with every option added (thousands of compositions);
    a bad interaction between config files is an interaction of two groups, which this covers in a
    few dozen rows. The full product still runs with `pytest -m slow`.
    """
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(factors)), 2)
                 for a in range(len(factors[i])) for b in range(len(factors[j]))}
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row = {i: a, j: b}
        for k in range(len(factors)):
            if k not in row:
                row[k] = max(range(len(factors[k])), key=lambda v: sum(
                    (min(k, m), v if k < m else w, max(k, m), w if k < m else v) in uncovered
                    for m, w in row.items()))
        uncovered -= {(i, row[i], j, row[j]) for i, j in itertools.combinations(range(len(factors)), 2)}
        rows.append(tuple(factors[k][row[k]] for k in range(len(factors))))
    return rows


PAIRWISE = [pair + tuple(rest) for pair, *rest in all_pairs([MODEL_SIZES, *OTHER_OPTIONS])]


def test_groups_are_discovered():
    assert len(COMBOS) >= 54            # guards against a test that silently checks nothing
    assert len(COMBOS) == len(MODEL_SIZES) * math.prod(len(options) for options in OTHER_OPTIONS)


def test_the_pairwise_rows_cover_every_pair_of_options():
    factors = [MODEL_SIZES, *OTHER_OPTIONS]
    rows = [((combo[0], combo[1]), *combo[2:]) for combo in PAIRWISE]
    for i, j in itertools.combinations(range(len(factors)), 2):
        assert {(row[i], row[j]) for row in rows} == set(itertools.product(factors[i], factors[j])), (i, j)
    assert len(PAIRWISE) < len(COMBOS) / 10
    assert {"tiny", "small", "1b", "mla_tiny", "mla_small", "mla_1b"} <= set(SIZES)
    assert {"cosine", "sgdr", "constant"} <= set(group_options("scheduler"))


def test_every_size_fits_some_model_and_every_model_has_its_family_sizes():
    assert {s for _, s in MODEL_SIZES} == set(SIZES)       # no preset is silently never built
    for model in MODELS:
        assert {s for m, s in MODEL_SIZES if m == model} == {s for s in SIZES if family_of(s) == FAMILY[model]}
    assert {("gqa", "tiny"), ("mla", "mla_tiny"), ("mla", "mla_1b")} <= set(MODEL_SIZES)
    assert len(MODEL_SIZES) + len(MISFITS) == len(MODELS) * len(SIZES)


MUST_BE_GIVEN = {"data.paths", "data.path"}     # the only ??? values: things no default can know


def compose_and_resolve(combo: tuple[str, ...], output_dir) -> None:
    cfg = compose_cfg(*(f"{g}={o}" for g, o in zip(GROUPS, combo)), f"paths.output_dir={output_dir}")
    OmegaConf.to_container(cfg, resolve=True)
    assert OmegaConf.missing_keys(cfg) <= MUST_BE_GIVEN


@pytest.mark.parametrize("combo", PAIRWISE, ids=["-".join(c) for c in PAIRWISE])
def test_every_pair_of_options_composes_and_resolves(combo, tmp_path):
    compose_and_resolve(combo, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("combo", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_combination_composes_and_resolves(combo, tmp_path):
    compose_and_resolve(combo, tmp_path)


@pytest.mark.parametrize("model, size", MODEL_SIZES, ids=["-".join(pair) for pair in MODEL_SIZES])
def test_every_model_builds_on_meta(model, size, tmp_path):
    cfg = compose_cfg(f"model={model}", f"model/size={size}", f"paths.output_dir={tmp_path}")
    with torch.device("meta"):
        net = build(cfg.model, vocab_size=cfg.model.vocab_size or 264)
    assert all(p.is_meta for p in net.parameters())


@pytest.mark.parametrize("model", MODELS)
def test_every_thinking_option_builds_with_every_model_on_meta(model, tmp_path):
    assert group_options("model/thinking") == ["hrpo", "hrpo_proj", "none"]
    for option in group_options("model/thinking"):
        cfg = compose_cfg(f"model={model}", f"model/thinking={option}", "strategy=grpo", f"paths.output_dir={tmp_path}")
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        with torch.device("meta"):
            net = build(cfg.model, vocab_size=264)
        assert (net.thinking is None) == (option == "none")


@pytest.mark.parametrize("model, size", MISFITS, ids=["-".join(pair) for pair in MISFITS])
def test_size_preset_of_another_attention_fails_at_build(model, size, tmp_path):
    cfg = compose_cfg(f"model={model}", f"model/size={size}", f"paths.output_dir={tmp_path}")
    # MLA names the presets to use instead; GQA names the MLA key it does not take.
    message = r"model/size=mla_tiny, mla_small or mla_1b" if FAMILY[model] == "mla" else "kv_lora_rank"
    with pytest.raises(InstantiationException, match=message), torch.device("meta"):
        build(cfg.model, vocab_size=cfg.model.vocab_size or 264)


def test_the_head_dim_hint_names_an_override_that_builds(tmp_path):
    sizes = ("model.dim=100", "model.attention.n_heads=3", "model.attention.n_kv_heads=1")   # 100 / 3 heads
    cfg = compose_cfg(*sizes, f"paths.output_dir={tmp_path}")
    with pytest.raises(InstantiationException, match=r"\+model.attention.head_dim=<n>"), torch.device("meta"):
        build(cfg.model, vocab_size=264)
    cfg = compose_cfg(*sizes, "+model.attention.head_dim=32", f"paths.output_dir={tmp_path}")
    with torch.device("meta"):
        assert build(cfg.model, vocab_size=264).layers[0].attn.head_dim == 32


@pytest.mark.parametrize("model, size", [("gqa", "1b"), ("mla", "mla_1b")])
def test_1b_presets_have_one_billion_parameters(model, size, tmp_path):
    cfg = compose_cfg(f"model={model}", f"model/size={size}", f"paths.output_dir={tmp_path}")
    with torch.device("meta"):
        net = build(cfg.model)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 1.0e9) <= 0.05e9, n


@pytest.mark.parametrize("group", ["strategy", "optimizer", "scheduler", "data", "data/tokenizer", "hardware",
                                   "callbacks"])
def test_every_option_instantiates(group, tmp_path):
    for option in group_options(group):
        cfg = compose_cfg(f"{group}={option}", f"paths.output_dir={tmp_path}")
        node = OmegaConf.select(cfg, group.replace("/", "."))
        if "paths" in node.keys():                # data=text / data=files: point it at a real file
            (tmp_path / "a.txt").write_text("hello")
            (tmp_path / "a.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n')
            node.paths = [str(tmp_path / ("a.jsonl" if option == "files" else "a.txt"))]
        if group == "data" and "path" in node.keys():        # data=shards: a folder written from that file
            (tmp_path / "a.txt").write_text("hello")
            node.path = str(tmp_path / option)
            write_shards([tmp_path / "a.txt"], node.path, ByteTokenizer(), "byte")
        if group == "data/tokenizer" and "path" in node.keys():  # data/tokenizer=file: the byte tokenizer's files
            write_tokenizer_files(ByteTokenizer(), tmp_path)
            node.path = str(tmp_path)
        if group == "hardware" and node.device == "cuda" and not torch.cuda.is_available():
            with pytest.raises(InstantiationException, match="CUDA is not available"):
                instantiate(node)
            continue
        if group == "hardware" and "nprocs" in node:        # ddp/fsdp: built in rank processes (test_distributed)
            with pytest.raises(InstantiationException, match="one process per rank"):
                instantiate(node)
            continue
        nodes = node.values() if group == "callbacks" else [node]
        for item in nodes:
            assert instantiate(item) is not None


@pytest.mark.parametrize("option", ["builtin", "text", "files", "shards"])
def test_data_options_show_every_argument_of_their_class(option, tmp_path):
    node = compose_cfg(f"data={option}", f"paths.output_dir={tmp_path}").data
    arguments = set(inspect.signature(get_class(node._target_)).parameters) - {"tokenizer"}
    assert arguments - set(node.keys()) == set()              # each one discoverable with --cfg job


DATA_TOKENIZERS = [(d, t) for d in group_options("data") for t in group_options("data/tokenizer")]


@pytest.mark.parametrize("data, tokenizer", DATA_TOKENIZERS, ids=["-".join(pair) for pair in DATA_TOKENIZERS])
def test_every_data_option_takes_every_tokenizer(data, tokenizer, tmp_path):
    cfg = compose_cfg(f"data={data}", f"data/tokenizer={tokenizer}", f"paths.output_dir={tmp_path}")
    assert HydraConfig.get().runtime.choices["data/tokenizer"] == tokenizer
    expected = {"byte": "ByteTokenizer", "file": "TokenizerFile"}[tokenizer]
    assert cfg.data.tokenizer._target_.rsplit(".", 1)[1] == expected


def test_unknown_group_option_is_refused_with_its_name(tmp_path):
    with pytest.raises(ConfigCompositionException, match="model/size.*huge|huge.*model/size"):
        compose_cfg("model/size=huge", f"paths.output_dir={tmp_path}")


EXPERIMENTS = group_options("experiment")


def test_experiments_are_visible_through_the_search_path_plugin():
    assert "tiny_long" in EXPERIMENTS


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_is_recorded(name, tmp_path):
    cfg = compose_cfg(f"experiment={name}", f"paths.output_dir={tmp_path}")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert f"`python run.py experiment={name}`" in (REPO / "experiments" / "README.md").read_text()
