"""Llama-style decoder-only transformer with pre-norm blocks (SPECS 1.1).

    x = embed(ids)
    for each block:  x = x + attn(attn_norm(x)),  x = x + ffn(ffn_norm(x))
    logits = lm_head(norm(x))

The attention and feed-forward classes are injected as factories (Hydra `_partial_: true`
nodes), called once per layer as `attention(dim=dim)` and `ffn(dim=dim)`, so a new flavour
(MLA, MoE) is a new file and a new YAML option, not a branch here. One RotaryEmbedding serves
all layers; its cos/sin are computed once per forward, and so is the attention mask.

Generation uses a preallocated KV cache (`new_cache`, then `forward(..., cache=cache)`) and
left-padded batches (`attention_mask_BT`); the interface every attention keeps is documented in
llmtrain/models/kv_cache.py.

Padding a causal model never attends to (right padding, pads after a completion's EOS) needs no
attention mask, but an FFN that keeps per-token statistics (the MoE balance loss) must not count
it: `token_mask_BT` (1 = real) says which tokens are real without leaving the unmasked attention
path, and goes to every FFN whose forward takes a `token_mask_BT` argument (the others keep the
plain x_BTD -> y_BTD contract). It defaults to `attention_mask_BT`, since left pads are padding too.

An optional `thinking` module (HRPO, llmtrain/models/thinking.py) blends a latent vector into the
input embedding of the positions marked as thinking (`latents_BTD`, `thinking_BT`); without it,
or without those arguments, the forward is the plain one.

Shape legend: B batch, T sequence, D model width, V vocabulary.
"""

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from llmtrain.models.kv_cache import KVCache, padding_attention_mask
from llmtrain.models.linear import Linear
from llmtrain.models.norm import RMSNorm
from llmtrain.models.rope import RotaryEmbedding

# Child names of the projections that write into the residual stream; init_weights scales them.
RESIDUAL_OUTPUT_NAMES = ("wo", "w2")


class Block(nn.Module):
    """One pre-norm residual block: attention then feed-forward.

    Args:
        dim: Model width D.
        attention: Factory called as `attention(dim=dim)`; the module maps
            (x_BTD, cos, sin, mask, cache) -> y_BTD (kv_cache.py states the contract).
        ffn: Factory called as `ffn(dim=dim)`; the module maps x_BTD -> y_BTD, or
            (x_BTD, token_mask_BT=None) -> y_BTD if it counts tokens (MoE's balance loss).
        norm_eps: Epsilon of both RMSNorms.
    """

    def __init__(
        self, dim: int, attention: Callable[..., nn.Module], ffn: Callable[..., nn.Module], norm_eps: float
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, norm_eps)
        self.attn = attention(dim=dim)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.ffn = ffn(dim=dim)
        self.ffn_takes_token_mask = "token_mask_BT" in inspect.signature(self.ffn.forward).parameters

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None,
                cache: Any = None, token_mask_BT: Tensor | None = None) -> Tensor:
        """Returns the updated residual stream x_BTD; `mask` and `cache` go to the attention,
        `token_mask_BT` (1 = real token) to an FFN that takes it."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, mask, cache)
        if token_mask_BT is not None and self.ffn_takes_token_mask:
            return x_BTD + self.ffn(self.ffn_norm(x_BTD), token_mask_BT=token_mask_BT)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))


class Transformer(nn.Module):
    """Decoder-only language model.

    Args:
        vocab_size: Number of token ids V.
        dim: Model width D.
        n_layers: Number of blocks L.
        attention: Per-layer attention factory (e.g. partial GQAttention); must expose `rope_dim`.
        ffn: Per-layer feed-forward factory (e.g. partial SwiGLU).
        norm_eps: Epsilon of every RMSNorm.
        rope_theta: RoPE base.
        max_seq_len: Longest position the RoPE table covers.
        tie_embeddings: Use the embedding matrix as the output projection (one Parameter).
        init_std: Standard deviation of the normal init; see `init_weights`.
        thinking: Optional factory called as `thinking(dim=dim)`: HRPO's latent blend of the input
            embeddings (llmtrain.models.thinking); None = plain token embeddings only.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        n_layers: int,
        attention: Callable[..., nn.Module],
        ffn: Callable[..., nn.Module],
        norm_eps: float = 1e-5,
        rope_theta: float = 1e6,
        max_seq_len: int = 2048,
        tie_embeddings: bool = True,
        init_std: float = 0.02,
        thinking: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if vocab_size <= 0 or dim <= 0 or n_layers <= 0:
            raise ValueError(
                f"vocab_size, dim and n_layers must be positive, got vocab_size={vocab_size}, "
                f"dim={dim}, n_layers={n_layers}"
            )
        if init_std <= 0:
            raise ValueError(f"init_std must be positive, got init_std={init_std}")
        self.vocab_size, self.dim, self.n_layers = vocab_size, dim, n_layers
        self.tie_embeddings, self.init_std = tie_embeddings, init_std
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(Block(dim, attention, ffn, norm_eps) for _ in range(n_layers))
        self.rope = RotaryEmbedding(self.layers[0].attn.rope_dim, rope_theta, max_seq_len)
        self.norm = RMSNorm(dim, norm_eps)
        self.lm_head = Linear(dim, vocab_size, bias=False)
        self.thinking: nn.Module | None = None
        if tie_embeddings:
            # Tied before any optimizer exists, so it sees a single tensor (SPECS 1.6).
            self.lm_head.weight = self.embed.weight
        self.init_weights()
        if thinking is not None:         # built last, so the trunk's init is the plain model's for the same seed
            self.thinking = thinking(dim=dim)

    def forward(self, ids_BT: Tensor, positions: Tensor | None = None, attention_mask_BT: Tensor | None = None,
                cache: KVCache | None = None, mask_BTT: Tensor | None = None, latents_BTD: Tensor | None = None,
                thinking_BT: Tensor | None = None, return_hidden: bool = False,
                logits_to_keep: int = 0, token_mask_BT: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Next-token logits of the T given tokens.

        Args:
            ids_BT: Token ids (with a cache: the new tokens only).
            positions: Positions (T,) or (B, T); None means each token's index among the real
                tokens of its row (0 .. T-1 without padding, continuing after the cache).
            attention_mask_BT: 1 = real token, 0 = left pad, for the T new tokens; None = all real.
            cache: From `new_cache`; the layers append to it and attend over everything in it.
            mask_BTT: bool, True = query t may attend to key s: a layout of several sequences in one
                row (e.g. DPO's prompt + chosen + rejected); give `positions` with it. No cache.
            latents_BTD: What an HRPO rollout stored per position (the thinking module's `source`:
                the latent, or the last hidden state it projects); needs `thinking_BT` and a model
                built with `thinking`.
            thinking_BT: bool, True = blend this position's embedding with its latent.
            return_hidden: Also return the final-norm hidden states (what lm_head reads).
            logits_to_keep: Compute the output (logits and hidden states) of the last
                `logits_to_keep` positions only; 0 = all T. A prefill needs only the last position:
                the output projection of all positions took 10% of a prompt forward (small GQA of
                benchmarks/, 16 x 32 tokens, 2 threads: 88 vs 79 ms).
            token_mask_BT: 1 = real token, 0 = padding (left or right), for the T new tokens: which
                tokens an MoE layer's balance loss counts; attention and outputs are unchanged.
                None = `attention_mask_BT` (None: all real). Right-padded training batches pass it.

        Returns:
            logits_BTV in the model's dtype (callers upcast for the loss if they need to), and
            hidden_BTD after it when `return_hidden` (T = `logits_to_keep` when that is given).
        """
        T = ids_BT.shape[1]
        past = 0 if cache is None else cache.length
        if mask_BTT is not None:         # several sequences share a row: the largest position counts
            if cache is not None or positions is None:
                raise ValueError("mask_BTT needs explicit positions and no cache")
            if int(positions.max()) >= self.rope.max_seq_len:
                raise ValueError(f"position {int(positions.max())} is beyond max_seq_len={self.rope.max_seq_len} "
                                 "(the RoPE table); shorten the input or build the model with a larger max_seq_len")
            default_positions, mask = None, mask_BTT[:, None]
            caches = [None] * self.n_layers
        elif past + T > self.rope.max_seq_len:
            raise ValueError(f"{past} cached + {T} new tokens exceed max_seq_len={self.rope.max_seq_len} "
                             "(the RoPE table); shorten the input or build the model with a larger max_seq_len")
        elif cache is None:
            default_positions, mask = _padding_positions_and_mask(attention_mask_BT)
            caches = [None] * self.n_layers
        else:
            default_positions = cache.advance(attention_mask_BT, T)
            mask = padding_attention_mask(cache.key_mask_BS[:, :past + T], T) if cache.padded else None
            caches = cache.layers
        cos, sin = self.rope(T, default_positions if positions is None else positions)
        x_BTD = self.embed(ids_BT)
        if latents_BTD is not None:
            x_BTD = self._think(x_BTD, latents_BTD, thinking_BT)
        token_mask_BT = attention_mask_BT if token_mask_BT is None else token_mask_BT
        for layer, layer_cache in zip(self.layers, caches):
            x_BTD = layer(x_BTD, cos, sin, mask, layer_cache, token_mask_BT=token_mask_BT)
        if cache is not None:
            cache.finish_step(T)
        h_BTD = self.norm(x_BTD[:, -logits_to_keep:] if logits_to_keep else x_BTD)
        return (self.lm_head(h_BTD), h_BTD) if return_hidden else self.lm_head(h_BTD)

    def _think(self, e_BTD: Tensor, latents_BTD: Tensor, thinking_BT: Tensor | None) -> Tensor:
        if self.thinking is None or thinking_BT is None:
            raise ValueError("latents_BTD needs thinking_BT and a model built with a thinking module "
                             "(model/thinking=hrpo)")
        return self.thinking(e_BTD, latents_BTD, thinking_BT)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_len` tokens (prompt + generated).

        dtype and device default to the embedding's. Raises ValueError when `max_len` exceeds the
        RoPE table, so a too-long generation fails before the prompt is processed.
        """
        if max_len > self.rope.max_seq_len:
            raise ValueError(f"a cache of {max_len} tokens exceeds max_seq_len={self.rope.max_seq_len} "
                             "(the RoPE table); generate fewer tokens or use a shorter prompt")
        dtype = self.embed.weight.dtype if dtype is None else dtype
        device = self.embed.weight.device if device is None else device
        layers = [layer.attn.new_cache(batch_size, max_len, dtype, device) for layer in self.layers]
        return KVCache(layers, batch_size, max_len, device)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "Transformer":
        # `to_empty` off the meta device gives each module its own new Parameter, which would
        # silently untie lm_head from embed; re-tie after every conversion.
        super()._apply(fn, recurse)
        for module in self.modules():        # kept no-grad weight copies (models/linear.py) are of the old weights
            module.__dict__.pop("_kept_weights", None)
        if self.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-initialise every parameter (a no-op on the meta device, so call again after `to_empty`).

        | parameter                                   | init                                      |
        |---------------------------------------------|-------------------------------------------|
        | embed.weight (= lm_head.weight when tied)   | normal(0, init_std)                       |
        | lm_head.weight when untied                  | normal(0, init_std)                       |
        | every nn.Linear weight not listed below     | normal(0, init_std)                       |
        | residual outputs `wo`, `w2` of every layer  | normal(0, init_std / sqrt(2 * n_layers))  |
        | every nn.Linear bias                        | zeros                                     |
        | every RMSNorm weight                        | ones                                      |
        | thinking (HRPO), when present               | its own `reset_parameters` (SPECS 5.2)    |

        The residual scaling is GPT-2's (Radford et al. 2019): the 2 * n_layers branches that add
        into the residual stream then sum to the variance of a single unscaled branch, so the
        stream does not grow with depth at init.
        """
        residual_std = self.init_std / math.sqrt(2 * self.n_layers)
        nn.init.normal_(self.embed.weight, std=self.init_std)
        if not self.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=self.init_std)
        for layer in self.layers:
            for name, module in layer.named_modules():
                if isinstance(module, nn.Linear):
                    is_residual = name.rsplit(".", 1)[-1] in RESIDUAL_OUTPUT_NAMES
                    nn.init.normal_(module.weight, std=residual_std if is_residual else self.init_std)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
                elif isinstance(module, RMSNorm):
                    nn.init.ones_(module.weight)
        nn.init.ones_(self.norm.weight)
        if self.thinking is not None:
            self.thinking.reset_parameters()

    def num_params(self) -> int:
        """Number of distinct parameter elements (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())


def _padding_positions_and_mask(mask_BT: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """Positions cumsum(mask) - 1 and the (B, 1, T, T) attention mask of a left-padded batch.

    (None, None) when there is no padding: the default positions and the is_causal fast path.
    """
    if mask_BT is None or bool(mask_BT.all()):
        return None, None
    mask_BT = mask_BT.bool()
    positions_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)  # pads get any valid position (SPECS 7.4)
    return positions_BT, padding_attention_mask(mask_BT, mask_BT.shape[1])
