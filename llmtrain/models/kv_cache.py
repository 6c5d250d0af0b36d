"""Preallocated KV caches for generation (SPECS 7.2-7.4), and the interface every attention keeps.

Interface contract (GQA and MLA both keep it; the Transformer relies on nothing else):

- `attention.new_cache(batch_size: int, max_len: int, dtype: torch.dtype, device: torch.device)
  -> cache`: the module's own cache class, preallocated for `max_len` tokens, with an int
  attribute `length` (tokens written so far, starts at 0) and `max_len`. GQA caches k and v of
  shape (B, n_kv_heads, max_len, head_dim), k after RoPE, kv heads never repeated. MLA caches its
  normalised latent (B, max_len, kv_lora_rank) and rotated rope key (B, max_len, rope_dim).
- `attention.forward(x_BTD, cos, sin, mask=None, cache=None) -> y_BTD`.
  * `mask=None`: plain causal attention over (cached tokens + the T new tokens); new token t
    sees every cached token and the new tokens <= t.
  * otherwise `mask` is a bool tensor (B, 1, T, S), True = may attend, S = cache.length + T with
    a cache (T without one). The Transformer builds it once per forward from the key padding
    mask; a pad query always sees itself, so no softmax row is all -inf (no NaN).
  * with a cache the module writes its new keys/values at [cache.length, cache.length + T),
    attends over [0, cache.length + T), then advances `cache.length` by T.
  * without a cache (training) the is_causal SDPA fast path is unchanged.
  * overflowing the cache raises ValueError (`check_room`), not an index error.
- `cache.repeat_rows_(n)`: every row becomes n contiguous copies of itself (row b -> rows
  b*n .. b*n+n-1), in place; generation prefills each distinct prompt once, then samples n
  completions of it (`generate(..., num_samples=n)`).
- `Block.forward(x, cos, sin, mask=None, cache=None)` passes both through.
- `Transformer.new_cache(batch_size, max_len, dtype=None, device=None) -> KVCache` (this file):
  one cache per layer plus the key padding mask (B, max_len) of every token written so far.
- `Transformer.forward(ids_BT, positions=None, attention_mask_BT=None, cache=None)`:
  `attention_mask_BT` (1 = real token, 0 = left pad) covers the T new tokens. Positions default
  to cumsum(mask) - 1 per row over the whole history (SPECS 7.4), or past_len + arange(T).
  It passes mask=None whenever nothing written so far is padding, so unpadded decoding and
  training stay on the unmasked paths.

Shared helpers for attention modules: `check_room(length, n_new, max_len)`,
`causal_mask(n_new, length, device)` (the offset causal mask for T > 1 new tokens after a
non-empty cache; SDPA's is_causal is top-left aligned), `padding_attention_mask`.

Shape legend: B batch, K kv heads, S max_len (cache slots), E head dim, T new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def check_room(length: int, n_new: int, max_len: int) -> None:
    """Raise a ValueError (not an index error) when `n_new` more tokens do not fit."""
    if length + n_new > max_len:
        raise ValueError(f"KV cache full: {length} cached + {n_new} new tokens > max_len={max_len}; "
                         "allocate a longer cache with model.new_cache(batch_size, max_len)")


def causal_mask(n_new: int, length: int, device: torch.device) -> Tensor:
    """(T, length + T) bool, True = may attend: new token t sees the `length` cached keys and new keys <= t.

    SDPA's `is_causal` aligns the triangle top-left, which is only right when nothing is cached.
    """
    return torch.ones(n_new, length + n_new, dtype=torch.bool, device=device).tril(diagonal=length)


class GQACache:
    """Preallocated keys (after RoPE) and values of one GQA layer (SPECS 7.2).

    Memory: 2 * n_kv_heads * head_dim numbers per token; kv heads are stored once, not repeated.

    Args:
        batch_size: B.
        n_kv_heads: K.
        max_len: S, the most tokens the cache holds (prompt + generated).
        head_dim: E.
        dtype: Storage dtype (the activation dtype).
        device: Where the buffers live.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k_BKSE = torch.zeros(shape, dtype=dtype, device=device)
        self.v_BKSE = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len, self.length = max_len, 0

    def append(self, k_BKTE: Tensor, v_BKTE: Tensor) -> tuple[Tensor, Tensor]:
        """Write T new keys/values at [length, length + T), advance `length`, return every key/value so far."""
        start, end = self.length, self.length + k_BKTE.shape[2]
        check_room(start, k_BKTE.shape[2], self.max_len)
        self.k_BKSE[:, :, start:end] = k_BKTE
        self.v_BKSE[:, :, start:end] = v_BKTE
        self.length = end
        return self.k_BKSE[:, :, :end], self.v_BKSE[:, :, :end]

    def repeat_rows_(self, n: int) -> None:
        """Each row becomes n contiguous copies of itself (see the interface contract above)."""
        self.k_BKSE, self.v_BKSE = (t.repeat_interleave(n, 0) for t in (self.k_BKSE, self.v_BKSE))


class KVCache:
    """The whole model's cache: one cache per layer plus the key padding history (SPECS 7.4).

    Rows are left-padded, so all rows share the write index `length`; `key_mask_BS` remembers
    which slots hold padding so that later decode steps never attend to them, and `n_real_B`
    counts each row's real tokens, which is the position of its next token.

    Args:
        layers: One cache per layer, from each attention's `new_cache`.
        batch_size: B.
        max_len: S.
        device: Where the bookkeeping tensors live.
    """

    def __init__(self, layers: Sequence[Any], batch_size: int, max_len: int,
                 device: torch.device | str | None) -> None:
        self.layers = list(layers)
        self.max_len, self.length = max_len, 0
        self.key_mask_BS = torch.ones(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_real_B = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.padded = False  # any pad written so far; False keeps decode on the unmasked fast path

    def advance(self, mask_BT: Tensor | None, n_new: int) -> Tensor:
        """Record T new tokens (mask: 1 = real, None = all real); returns their positions (B, T).

        Does not move `length`: each layer's attention advances its own cache, and this object's
        `length` follows in `finish_step`.
        """
        check_room(self.length, n_new, self.max_len)
        if mask_BT is None:
            positions_BT = self.n_real_B[:, None] + torch.arange(n_new, device=self.n_real_B.device)
            self.n_real_B += n_new
            return positions_BT
        mask_BT = mask_BT.bool()
        self.key_mask_BS[:, self.length:self.length + n_new] = mask_BT
        self.padded = self.padded or not bool(mask_BT.all())
        positions_BT = self.n_real_B[:, None] + mask_BT.cumsum(-1) - 1
        self.n_real_B += mask_BT.sum(-1)
        return positions_BT.clamp(min=0)  # pads get any valid position; they are masked anyway

    def finish_step(self, n_new: int) -> None:
        self.length += n_new

    def repeat_rows_(self, n: int) -> None:
        """Each row becomes n contiguous copies of itself, in every layer and in the bookkeeping."""
        for layer in self.layers:
            layer.repeat_rows_(n)
        self.key_mask_BS, self.n_real_B = (t.repeat_interleave(n, 0) for t in (self.key_mask_BS, self.n_real_B))


def padding_attention_mask(key_mask_BS: Tensor, n_new: int) -> Tensor:
    """(B, 1, T, S) bool for the last T of S keys: causal, pad keys hidden, every query sees itself.

    A pad query would otherwise see no key at all, and softmax over all -inf is NaN (SPECS 7.4);
    its output is garbage that nothing reads, but it must stay finite.
    """
    S = key_mask_BS.shape[1]
    length = S - n_new
    causal_TS = causal_mask(n_new, length, key_mask_BS.device)
    allowed_BTS = causal_TS & key_mask_BS[:, None, :]
    t_T = torch.arange(n_new, device=key_mask_BS.device)
    allowed_BTS[:, t_T, length + t_T] = True
    return allowed_BTS[:, None]
