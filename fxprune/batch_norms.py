"""Re-estimate BatchNorm running statistics on calibration data after pruning without fine-tuning.

Removing channels (and re-fitting the layers that read them) changes the inputs of the BatchNorm layers
after them, so the running mean and variance learned on the dense model no longer normalise them; a
fine-tune would re-learn them, a one-shot prune keeps the stale ones. One pass over calibration batches
with every BatchNorm in train mode and a cumulative average (``momentum=None``) measures them again
(adaptive BatchNorm, as EagleEye does before it ranks candidates). Only running statistics change: the
weights and masks stay, so ``compact()`` still equals the masked model.
"""

from __future__ import annotations

import warnings
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
    stays in eval mode (dropout off). Under ``torch.distributed`` the averages are combined over ranks,
    weighted by the batches that reached each layer, as one process over all batches would average them
    (SyncBatchNorm is refused there). A layer no batch reaches keeps its statistics, with a warning. On an
    error the old statistics are put back. Returns the names of the layers re-estimated.
    """
    norms = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None}
    if not norms:
        raise ValueError("reestimate_batch_norms() found no BatchNorm layer with running statistics in the model: "
                         "there is nothing to re-estimate")
    distributed = dist.is_available() and dist.is_initialized()
    synced = [n for n, m in norms.items() if isinstance(m, nn.SyncBatchNorm)]
    if distributed and synced:
        raise ValueError(f"reestimate_batch_norms() under torch.distributed with SyncBatchNorm layers "
                         f"({synced[0]}{', ...' if len(synced) > 1 else ''}): in train mode they synchronise on every "
                         "call, which needs a GPU and the same number of batches on every rank; run this pass in "
                         "one process, where they act as plain BatchNorm")
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
        if distributed:  # the average over every rank's batches, weighted by how many reached each layer
            for m in norms.values():
                count = m.num_batches_tracked.to(m.running_mean.dtype)
                for t in (m.running_mean, m.running_var):
                    t.mul_(count)
                    dist.all_reduce(t)
                dist.all_reduce(m.num_batches_tracked)
                total = m.num_batches_tracked.to(m.running_mean.dtype).clamp(min=1)
                m.running_mean.div_(total)
                m.running_var.div_(total)
        unseen = [n for n, m in norms.items() if int(m.num_batches_tracked) == 0]
        for n in unseen:  # no batch reached it (an auxiliary head, a branch not taken): it keeps what it had
            norms[n].running_mean.copy_(saved[n][2])
            norms[n].running_var.copy_(saved[n][3])
            norms[n].num_batches_tracked.copy_(saved[n][4])
        if unseen:
            warnings.warn(f"reestimate_batch_norms(): no batch reached {len(unseen)} BatchNorm layers ({unseen[0]}"
                          f"{', ...' if len(unseen) > 1 else ''}); they keep their statistics", UserWarning, stacklevel=3)
    except BaseException:
        for n, m in norms.items():
            m.running_mean.copy_(saved[n][2])
            m.running_var.copy_(saved[n][3])
            m.num_batches_tracked.copy_(saved[n][4])
        raise
    finally:
        for n, m in norms.items():
            m.momentum, m.training = saved[n][0], saved[n][1]
    return sorted(n for n in norms if n not in unseen)
