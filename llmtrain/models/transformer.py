"""Llama-style decoder-only transformer with pre-norm blocks (SPECS 1.1).

    x = embed(ids)
    for each block:  x = x + attn(attn_norm(x)),  x = x + ffn(ffn_norm(x))
    logits = lm_head(norm(x))

The attention and feed-forward classes are injected as factories (Hydra `_partial_: true`
nodes), called once per layer as `attention(dim=dim)` and `ffn(dim=dim)`, so a new flavour
(MLA, MoE) is a new file and a new YAML option, not a branch here. One RotaryEmbedding serves
all layers; its cos/sin are computed once per forward.

Shape legend: B batch, T sequence, D model width, V vocabulary.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from llmtrain.models.norm import RMSNorm
from llmtrain.models.rope import RotaryEmbedding

# Child names of the projections that write into the residual stream; init_weights scales them.
RESIDUAL_OUTPUT_NAMES = ("wo", "w2")


class Block(nn.Module):
    """One pre-norm residual block: attention then feed-forward.

    Args:
        dim: Model width D.
        attention: Factory called as `attention(dim=dim)`; the module maps (x_BTD, cos, sin) -> y_BTD.
        ffn: Factory called as `ffn(dim=dim)`; the module maps x_BTD -> y_BTD.
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

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Returns the updated residual stream x_BTD."""
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin)
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
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        if tie_embeddings:
            # Tied before any optimizer exists, so it sees a single tensor (SPECS 1.6).
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    def forward(self, ids_BT: Tensor, positions: Tensor | None = None) -> Tensor:
        """Next-token logits.

        Args:
            ids_BT: Token ids.
            positions: Positions (T,) or (B, T); None means 0 .. T-1.

        Returns:
            logits_BTV in the model's dtype (callers upcast for the loss if they need to).
        """
        x_BTD = self.embed(ids_BT)
        cos, sin = self.rope(ids_BT.shape[1], positions)
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos, sin)
        return self.lm_head(self.norm(x_BTD))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "Transformer":
        # `to_empty` off the meta device gives each module its own new Parameter, which would
        # silently untie lm_head from embed; re-tie after every conversion.
        super()._apply(fn, recurse)
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

    def num_params(self) -> int:
        """Number of distinct parameter elements (a tied matrix counts once)."""
        return sum(p.numel() for p in self.parameters())
