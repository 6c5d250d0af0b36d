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
    before, after = _nearest_cycle_ends(total_steps - warmup_steps, cycle_steps, t_mult)
    if warmup_steps >= total_steps:
        log.warning("sgdr: scheduler.warmup_steps=%d >= the run's %d steps, so the lr only ramps up and no "
                    "cycle starts", warmup_steps, total_steps)
    elif after != total_steps - warmup_steps:
        log.warning("sgdr: %d steps after warmup stop in the middle of a cycle (at a high lr); "
                    "cycles end after %s steps", total_steps - warmup_steps,
                    f"{before} or {after}" if before > 0 else after)
    fn = functools.partial(sgdr_multiplier, warmup_steps=warmup_steps, cycle_steps=cycle_steps,
                           t_mult=t_mult, min_rate=min_rate)
    return LambdaLR(optimizer, fn)


def constant(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warmup then the peak lr (`total_steps` is accepted for a uniform signature)."""
    _check(warmup_steps, 0.0)
    return LambdaLR(optimizer, functools.partial(constant_multiplier, warmup_steps=warmup_steps))


def _nearest_cycle_ends(steps: int, cycle_steps: int, t_mult: int) -> tuple[int, int]:
    """(the last cycle end before `steps`, or 0; the first end at or after `steps`).

    Every end is walked, not a fixed few: a 3000-step run of 2-step cycles ends on its 1500th. With
    t_mult=1 the ends are the multiples of cycle_steps, computed rather than walked one by one.
    """
    if t_mult == 1:
        after = max(1, -(-steps // cycle_steps)) * cycle_steps      # ceil, and at least the first end
        return after - cycle_steps, after
    before, end, length = 0, cycle_steps, cycle_steps
    while end < steps:                    # lengths grow geometrically: a few dozen iterations at most
        before, length = end, length * t_mult
        end += length
    return before, end
