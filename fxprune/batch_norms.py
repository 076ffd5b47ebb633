"""Re-estimate BatchNorm running statistics on calibration data after pruning without fine-tuning.

Removing channels (and re-fitting the layers that read them) changes the inputs of the BatchNorm layers
after them, so the running mean and variance learned on the dense model no longer normalise them; a
fine-tune would re-learn them, a one-shot prune keeps the stale ones. One pass over calibration batches
with every BatchNorm in train mode and a cumulative average (``momentum=None``) measures them again
(adaptive BatchNorm, as EagleEye does before it ranks candidates). Only running statistics change: the
weights and masks stay, so ``compact()`` still equals the masked model.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

__all__ = ["reestimate_batch_norms"]


@torch.no_grad()
def reestimate_batch_norms(model: nn.Module, batches: Iterable, run, progress: bool | None = None) -> list[str]:
    """Replace the running statistics of every BatchNorm of ``model`` by their average over ``batches``.

    ``run(batch)`` runs the model on one batch (``fxprune.calibration.inference``); the rest of the model
    stays in eval mode (dropout off). Under ``torch.distributed`` the averages are averaged over ranks, which
    equals one process over all batches where every rank runs as many. On an error the old statistics are put
    back. Returns the names of the layers re-estimated.
    """
    norms = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None}
    if not norms:
        raise ValueError("reestimate_batch_norms() found no BatchNorm layer with running statistics in the model: "
                         "there is nothing to re-estimate")
    saved = {n: (m.momentum, m.training, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for n, m in norms.items()}
    seen = 0
    try:
        for m in norms.values():
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc="batch norms", leave=False,
                          disable=True if progress is False else None):
            run(batch)
            seen += 1
        if not seen:
            raise ValueError("reestimate_batch_norms() got no batches: pass an iterable of model inputs")
        if dist.is_available() and dist.is_initialized():  # the average over every rank's batches
            world = dist.get_world_size()
            for m in norms.values():
                for t in (m.running_mean, m.running_var):
                    dist.all_reduce(t)
                    t /= world
    except BaseException:
        for n, m in norms.items():
            m.running_mean.copy_(saved[n][2])
            m.running_var.copy_(saved[n][3])
            m.num_batches_tracked.copy_(saved[n][4])
        raise
    finally:
        for n, m in norms.items():
            m.momentum, m.training = saved[n][0], saved[n][1]
    return sorted(norms)
