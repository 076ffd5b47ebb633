"""Sparsity schedules: what sparsity each pruning step aims at.

Oneshot (start_step == end_step) jumps to the target at start_step. Iterative
prunes at start_step, start_step + f, … up to end_step; the k-th of T pruning
steps (k = 1..T) aims at ``s(k / T)``, so the first pruning step already prunes and
the last reaches the target exactly (the reference is off by one on both). Under a
latency target the scheduled quantity is the fraction of the dense latency removed.
"""

from __future__ import annotations

import math

__all__ = ["Scheduler", "get_scheduler"]


class Scheduler:
    def __init__(self, config):
        self.start, self.end = config.start_step, config.end_step
        self.freq = config.update_frequency_on_step
        # under a latency target the schedule moves the fraction of the dense latency removed instead:
        # 1 - 1/target_speedup, or for target_latency_ms set once the dense model is timed
        self.target = (1.0 - 1.0 / config.target_speedup if config.target_speedup is not None
                       else 0.0 if config.target_latency_ms is not None
                       else min(config.target_sparsity, config.max_sparsity_ratio_per_layer))
        self.decay = config.sparsity_decay_type

    @property
    def oneshot(self) -> bool:
        return self.start == self.end

    @property
    def total(self) -> int:
        """Number of pruning steps T."""
        return 1 if self.oneshot else (self.end - self.start) // self.freq + 1

    def is_pruning_step(self, step: int) -> bool:
        return self.start <= step <= self.end and (step - self.start) % self.freq == 0

    def sparsity(self, step: int) -> float:
        """Target sparsity after the pruning step at ``step`` (held between pruning steps)."""
        if step < self.start:
            return 0.0
        k = min((step - self.start) // self.freq + 1, self.total)
        r = k / self.total
        s = self.target
        if k == self.total:  # the target itself, not a curve's rounding of it (cos(pi/2) is 6e-17, not 0)
            return s
        if self.decay == "exp":
            return 1.0 - (1.0 - s) ** r
        if self.decay == "cos":
            return s * (1.0 - math.cos(math.pi / 2 * r))
        if self.decay == "linear":
            return s * r
        return s * r ** 3  # cube


def get_scheduler(config) -> Scheduler:
    return Scheduler(config)
