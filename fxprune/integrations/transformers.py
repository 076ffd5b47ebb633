"""Prune while the Hugging Face ``Trainer`` fine-tunes: ``callbacks=[PruningCallback(pruning)]``.

The Trainer owns the loop, so the pruning hooks run from its callback events. Steps are
optimizer steps: with gradient accumulation, ``pruning.global_step`` follows the Trainer's
``state.global_step``, and the gradient criteria see the accumulated (and, with
``max_grad_norm``, clipped) gradients right before the optimizer steps, after DDP has
averaged them, so every rank prunes the same channels.
"""

from __future__ import annotations

import os
import warnings

import torch

from fxprune.api import Pruning
from fxprune.errors import PruningError

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError("fxprune.integrations.transformers needs the transformers package (and accelerate, which "
                      "its Trainer uses): pip install fxprune[transformers]") from err

__all__ = ["PruningCallback", "STATE_NAME"]

STATE_NAME = "fxprune_pruning.pt"
"""File the pruning state is saved to, inside each Trainer checkpoint folder."""


class PruningCallback(TrainerCallback):
    """Runs the hooks of ``pruning`` from the Trainer's events and keeps its state in the checkpoints.

    Pass ``model=pruning.model`` to the Trainer. On each checkpoint the main process writes
    ``pruning.state_dict()`` to ``checkpoint-N/fxprune_pruning.pt``, beside the Trainer's own
    state. When ``train(resume_from_checkpoint=...)`` resumes at step N, that file is read
    from the first of these that holds one saved at step N: ``resume_from``,
    ``args.resume_from_checkpoint``, then ``args.output_dir/checkpoint-N`` (where
    ``resume_from_checkpoint=True`` and the Trainer's own folders point). Resuming
    without it raises, because the masks and scores would start over. With
    ``load_best_model_at_end``, the best checkpoint's pruning state is loaded with its weights.

    With ``bf16``/``fp16``, the Trainer wraps ``pruning.model.forward`` in autocast; that wrapper
    is removed at the end of training, so ``pruning.compact()`` compares in float32 (a later
    ``trainer.evaluate()`` then computes in float32 too).
    """

    def __init__(self, pruning: Pruning, resume_from: str | os.PathLike | None = None):
        if not isinstance(pruning, Pruning):
            raise TypeError(f"PruningCallback takes what fxprune.compile() returns, got {type(pruning).__name__}")
        self.pruning = pruning
        self.resume_from = resume_from

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and model is not self.pruning.model:
            raise PruningError("the Trainer trains another model than pruning.model, so the masks would never "
                               "reach it; build the Trainer with model=pruning.model")
        if state.global_step > 0:
            self._resume(args, state)
        self.pruning.on_train_begin()

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.pruning.on_epoch_begin(int(state.epoch or 0))

    def on_step_begin(self, args, state, control, **kwargs):
        self.pruning.on_step_begin(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.pruning.on_before_optimizer_step()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pruning.on_after_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        self.pruning.on_step_end()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.pruning.on_epoch_end()

    def on_train_end(self, args, state, control, **kwargs):
        if args.load_best_model_at_end and state.best_model_checkpoint:
            self._load_best(state.best_model_checkpoint)
        self.pruning.on_train_end()
        from accelerate.utils import extract_model_from_parallel

        extract_model_from_parallel(self.pruning.model, keep_fp32_wrapper=False)

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(f"fxprune: no checkpoint folder {folder} to save the pruning state in (a hyperparameter "
                          "search writes elsewhere); this checkpoint cannot resume pruning", UserWarning, stacklevel=2)
            return
        torch.save(self.pruning.state_dict(), os.path.join(folder, STATE_NAME))

    def _resume(self, args, state) -> None:
        step = state.global_step
        candidates = [self.resume_from, getattr(args, "resume_from_checkpoint", None),
                      os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")]
        found = []
        for folder in [os.fspath(c) for c in candidates if c]:
            path = os.path.join(folder, STATE_NAME)
            if not os.path.isfile(path):
                continue
            saved = self._read(path)
            if saved.get("global_step") == step:
                self.pruning.load_state_dict(saved)
                return
            found.append(f"{path} (step {saved.get('global_step')})")
        where = ", ".join(found) or f"no {STATE_NAME} in {', '.join(os.fspath(c) for c in candidates if c)}"
        raise PruningError(f"the Trainer resumes at step {step} but no pruning state of that step was found ({where}); "
                           "pass PruningCallback(pruning, resume_from='path/to/checkpoint-N'), the folder the "
                           "Trainer resumes from")

    def _load_best(self, folder: str) -> None:
        """The Trainer has loaded the weights of its best checkpoint: its masks and scores go with them."""
        path = os.path.join(folder, STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(f"fxprune: the Trainer loaded its best checkpoint {folder}, which has no {STATE_NAME}; "
                          "its weights are masked with the masks of the last step instead", UserWarning, stacklevel=2)
            return
        self.pruning.load_state_dict(self._read(path))

    def _read(self, path: str) -> dict:
        """A saved pruning state, its scores on the device of their parameter (it is read onto the CPU)."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict):
            raise PruningError(f"{path} is not a pruning state (expected what Pruning.state_dict() returns)")
        for pruner, ps in zip(self.pruning.pruners, saved.get("pruners", [])):
            if isinstance(ps, dict) and isinstance(ps.get("scores"), dict):
                ps["scores"] = {k: v.to(pruner.modules[k].device) if k in pruner.modules else v
                                for k, v in ps["scores"].items()}
        return saved
