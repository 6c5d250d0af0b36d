"""Learning-rate schedules as multipliers for `LambdaLR` (SPECS.md section 6).

A multiplier scales every parameter group's own base lr, so per-group ratios are preserved. `s`
counts optimizer steps: `m(0)` is the multiplier of the first update.
"""

from __future__ import annotations

import functools
import logging
import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger(__name__)


def _check(warmup_steps: int, min_rate: float) -> None:
    if warmup_steps < 0:
        raise ValueError(f"scheduler.warmup_steps={warmup_steps} must be >= 0")
    if not 0.0 <= min_rate < 1.0:
        raise ValueError(f"scheduler.min_rate={min_rate} must be in [0, 1) (a fraction of the peak lr)")


def _half_cosine(progress: float, min_rate: float) -> float:
    return min_rate + (1.0 - min_rate) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_multiplier(s: int, *, total_steps: int, warmup_steps: int, min_rate: float) -> float:
    """Linear warmup `(s+1)/W`, then cosine from 1 down to `min_rate`, reached at s = total_steps."""
    if s < warmup_steps:
        return (s + 1) / warmup_steps
    progress = (s - warmup_steps) / max(1, total_steps - warmup_steps)
    return _half_cosine(min(progress, 1.0), min_rate)


def sgdr_multiplier(s: int, *, warmup_steps: int, cycle_steps: int, t_mult: int, min_rate: float) -> float:
    """One warmup, then cosine cycles of length T_0, T_0 t_mult, ...; each restarts at the peak."""
    if s < warmup_steps:
        return (s + 1) / warmup_steps
    u, start, length = s - warmup_steps, 0, cycle_steps
    while u >= start + length:            # integer walk: a float log misplaces cycle boundaries
        start, length = start + length, length * t_mult
    return _half_cosine((u - start) / length, min_rate)


def constant_multiplier(s: int, *, warmup_steps: int) -> float:
    return (s + 1) / warmup_steps if s < warmup_steps else 1.0


def cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_rate: float = 0.1) -> LambdaLR:
    """Linear warmup then cosine decay to `min_rate` x the peak lr over `total_steps`."""
    _check(warmup_steps, min_rate)
    if warmup_steps >= total_steps:             # e.g. a 3-step trial of a preset: still runs
        log.warning("cosine: scheduler.warmup_steps=%d >= the run's %d steps, so the lr only ramps up "
                    "and never decays", warmup_steps, total_steps)
    fn = functools.partial(cosine_multiplier, total_steps=total_steps, warmup_steps=warmup_steps,
                           min_rate=min_rate)
    return LambdaLR(optimizer, fn)


def sgdr(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, cycle_steps: int = 100,
         t_mult: int = 2, min_rate: float = 0.1) -> LambdaLR:
    """SGDR (Loshchilov & Hutter 2017): cosine cycles T_0, T_0 t_mult, ..., instant restarts."""
    _check(warmup_steps, min_rate)
    if cycle_steps < 1 or t_mult < 1:
        raise ValueError(f"scheduler.cycle_steps={cycle_steps} and t_mult={t_mult} must be >= 1")
    if not _ends_a_cycle(total_steps - warmup_steps, cycle_steps, t_mult):
        log.warning("sgdr: %d steps after warmup stop in the middle of a cycle (at a high lr); "
                    "cycles end after %s steps", total_steps - warmup_steps,
                    _cycle_ends(total_steps - warmup_steps, cycle_steps, t_mult))
    fn = functools.partial(sgdr_multiplier, warmup_steps=warmup_steps, cycle_steps=cycle_steps,
                           t_mult=t_mult, min_rate=min_rate)
    return LambdaLR(optimizer, fn)


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup then the peak lr (`total_steps` is accepted for a uniform signature)."""
    _check(warmup_steps, 0.0)
    return LambdaLR(optimizer, functools.partial(constant_multiplier, warmup_steps=warmup_steps))


def _cycle_ends(limit: int, cycle_steps: int, t_mult: int) -> list[int]:
    ends, end, length = [], cycle_steps, cycle_steps
    while end <= limit + length and len(ends) < 8:
        ends.append(end)
        length *= t_mult
        end += length
    return ends


def _ends_a_cycle(steps: int, cycle_steps: int, t_mult: int) -> bool:
    return steps in _cycle_ends(steps, cycle_steps, t_mult)
