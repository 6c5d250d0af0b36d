"""HRPO decoding (SPECS 5.1-5.4): each thinking token enters the model blended with a latent.

Per step, the sampler's distribution p_t (after temperature, top-k, top-p) gives the next token
x; the model's thinking module turns (p_t, the last hidden state) into the vector the rollout
stores (`source`: the latent itself, or the hidden state it projects), and x's input embedding is
blended with it while x's row is thinking. So each token is blended with the latent of the
distribution it was drawn from, prompt tokens never are, and the stored vectors replayed through
`Transformer.forward(..., latents_BTD=, thinking_BT=)` give the same log-probs (tested). Greedy
decoding (evaluation) takes the argmax token but the latent of softmax(logits / latent_temperature),
the distribution training sampled from (SPECS 5.5).

A row thinks from its first generated token until its decoded completion contains the answer
marker; the token that completes the marker and all later ones are plain, as are the pads after
EOS. The marker is looked for in the decoded text of the row's last few tokens, not as a token-id
subsequence: a BPE marker can merge with its neighbours (SPECS 5.3).

Shape legend: B rows, P padded prompt length, N new tokens, V vocabulary, D model width.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from llmtrain.data.tokenizer import decode_sampled
from llmtrain.generate import Sampler, all_finished, prefill, ranks_decode_together, token_logprobs


class AnswerWatch:
    """Per-row `is_thinking`: True until the row's completion text contains `marker`.

    Args:
        marker: The answer marker, e.g. "<answer>" or "####".
        decode: Token ids -> text, special tokens written by name (so a special token can be the marker).
        batch_size: B.
    """

    def __init__(self, marker: str, decode: Callable[[Sequence[int]], str], batch_size: int) -> None:
        self.marker, self.decode = marker, decode
        # every token decodes to >= 1 byte (or a special token's name): a marker of L bytes, even one
        # merged into its neighbours, lies within the last L + 2 tokens once its last byte is out
        self.window = len(marker.encode()) + 2
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]
        self.thinking = [True] * batch_size

    def update(self, next_B: Tensor, finished_B: Tensor) -> Tensor:
        """Append each unfinished row's new token; (B,) bool: that token is a thinking token."""
        done = finished_B.tolist()
        for b, token in enumerate(next_B.tolist()):
            if self.thinking[b] and not done[b]:
                self.rows[b].append(token)
                self.thinking[b] = self.marker not in self.decode(self.rows[b][-self.window:])
        return torch.tensor(self.thinking, device=next_B.device) & ~finished_B


def whole(weight: Tensor) -> Tensor:
    """The full tensor of a parameter read outside forward, where FSDP2 keeps only this rank's shard
    (a DTensor). Gathering is a collective: every rank decodes its own rollout, so all reach it."""
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


def thinking_decoder(model: nn.Module, tokenizer: Any) -> ThinkingDecoder | None:
    """HRPO decoding for a model built with a `thinking` module (its answer marker, `tokenizer`'s text
    with special tokens by name), else None: how rollouts, evaluation and `llmtrain generate` decode."""
    thinking = getattr(getattr(model, "module", model), "thinking", None)     # through a DDP wrapper
    if thinking is None:
        return None
    return ThinkingDecoder(thinking.answer_marker, lambda ids: decode_sampled(tokenizer, ids, skip_special=False),
                           thinking.latent_temperature)


class ThinkingDecoder:
    """`generate(..., thinking=ThinkingDecoder(marker, decode))`: the KV-cached loop with HRPO's blend.

    Args:
        answer_marker: Text that ends a row's thinking (the model's `thinking.answer_marker`).
        decode: Token ids -> text with special tokens by name, e.g.
            `lambda ids: tokenizer.decode(ids, skip_special=False)`.
        latent_temperature: Greedy decoding (temperature 0) only: the latents come from
            softmax(logits / latent_temperature), the training rollouts' distribution (SPECS 5.5);
            a sampling decode builds them from the distribution it draws from.
    """

    def __init__(self, answer_marker: str, decode: Callable[[Sequence[int]], str],
                 latent_temperature: float = 1.0) -> None:
        self.answer_marker, self.decode_text, self.latent_temperature = answer_marker, decode, latent_temperature

    def decode(self, model: nn.Module, ids_BP: Tensor, mask_BP: Tensor, num_samples: int, max_new_tokens: int,
               eos_id: int, pad_id: int, sampler: Sampler, return_logprobs: bool
               ) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """Prefill, then one cached forward per token; tokens, mask, logprobs, latents_BND, thinking_BN
        (B = prompts x num_samples rows, as llmtrain.generate.prefill lays them out)."""
        B, device, N = ids_BP.shape[0] * num_samples, ids_BP.device, max_new_tokens
        tokens_BN = torch.full((B, N), pad_id, dtype=torch.long, device=device)
        mask_BN = torch.zeros((B, N), dtype=torch.long, device=device)
        logprobs_BN = torch.zeros((B, N), device=device) if return_logprobs else None
        latents_BND = torch.zeros((B, N, model.dim), device=device)
        thinking_BN = torch.zeros((B, N), dtype=torch.bool, device=device)
        if N == 0:
            return tokens_BN, mask_BN, logprobs_BN, latents_BND, thinking_BN
        cache, ids_BP, mask_BP, logits_BV, hidden_BD = prefill(model, ids_BP, mask_BP, num_samples, N,
                                                               return_hidden=True)
        sampler.start(ids_BP, mask_BP, logits_BV.shape[-1])
        embed_VD, together = whole(model.embed.weight), ranks_decode_together(model)
        watch, finished_B = AnswerWatch(self.answer_marker, self.decode_text, B), torch.zeros_like(thinking_BN[:, 0])
        for n in range(N):
            next_B, probs_BV = sampler.sample_with_probs(logits_BV, self.latent_temperature)
            next_B.masked_fill_(finished_B, pad_id)                          # SPECS 7.5
            tokens_BN[:, n], mask_BN[:, n] = next_B, ~finished_B
            if logprobs_BN is not None:
                logp_B = token_logprobs(logits_BV.float(), next_B, sampler.temperature)
                logprobs_BN[:, n] = logp_B.masked_fill_(finished_B, 0.0)
            latents_BND[:, n] = model.thinking.source(probs_BV, hidden_BD, embed_VD)
            thinking_BN[:, n] = watch.update(next_B, finished_B)
            finished_B |= next_B == eos_id
            if n + 1 == N or all_finished(finished_B, together):
                break
            logits_BTV, hidden_BTD = model(next_B[:, None], cache=cache, latents_BTD=latents_BND[:, n:n + 1],
                                           thinking_BT=thinking_BN[:, n:n + 1], return_hidden=True)
            logits_BV, hidden_BD = logits_BTV[:, -1], hidden_BTD[:, -1]
        steps = n + 1
        return (tokens_BN[:, :steps], mask_BN[:, :steps], None if logprobs_BN is None else logprobs_BN[:, :steps],
                latents_BND[:, :steps], thinking_BN[:, :steps])
