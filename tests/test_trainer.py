"""The Hugging Face Trainer prunes on schedule through PruningCallback alone.

A tiny random-init BERT classifier on synthetic token sequences: 12 optimizer steps of 2
accumulated micro-batches each, iterative snip_momentum pruning on steps 1..8. Run as a
module (``python -m torch.distributed.run ... -m tests.test_trainer OUT``), this file is
also the worker of the two-process DDP test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import transformers

import fxprune
from fxprune.errors import PruningError
from fxprune.integrations.transformers import STATE_NAME, PruningCallback

STEPS, ACCUMULATE, BATCH, SEQ, VOCAB = 12, 2, 4, 16, 100
CONFIG = {"pruning_type": "snip_momentum", "target_sparsity": 0.5, "start_step": 1, "end_step": 8,
          "update_frequency_on_step": 1, "round_to": 1}
# float32 compact vs masked on fresh inputs: only the order of shorter sums differs (~1e-7 here)
EXACT = {"atol": 1e-5, "rtol": 1e-5}


class Tokens(torch.utils.data.Dataset):
    """Random token sequences with right padding; the label is whether the first token is in the upper half."""

    def __init__(self, n: int = 48, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=gen)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=gen)
        self.mask = (torch.arange(SEQ) < lengths[:, None]).long()
        self.ids = self.ids * self.mask
        self.labels = (self.ids[:, 0] >= VOCAB // 2).long()
        self.seen: list[int] = []  # indices read, in order (the DDP test shows each rank reads its own shard)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        self.seen.append(int(i))
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _pruning() -> fxprune.Pruning:
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=VOCAB, max_position_embeddings=64)
    model = transformers.BertForSequenceClassification(cfg)
    ids = torch.randint(1, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0))
    return fxprune.compile(model, (ids,), CONFIG, example_kwargs={"attention_mask": torch.ones(1, SEQ, dtype=torch.long)})


def _trainer(pruning, out, callbacks=(), data=None, eval_data=None, **overrides) -> transformers.Trainer:
    options = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH,
                   gradient_accumulation_steps=ACCUMULATE, learning_rate=5e-3, weight_decay=0.01, warmup_steps=2,
                   max_grad_norm=1.0, seed=0, use_cpu=True, report_to=[], dataloader_num_workers=0,
                   save_strategy="no", logging_strategy="no", disable_tqdm=True)
    args = transformers.TrainingArguments(**{**options, **overrides})
    return transformers.Trainer(model=pruning.model, args=args, train_dataset=data or Tokens(), eval_dataset=eval_data,
                                callbacks=[PruningCallback(pruning), *callbacks])


def _masked_and_compact(pruning) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the masked model and of ``compact()`` on a batch neither training nor compact() saw (one row padded)."""
    pruning.model.eval()
    small = pruning.compact()  # checks itself against the masked model on the example, in float32
    ids = torch.randint(1, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(12345))
    mask = torch.ones(3, SEQ, dtype=torch.long)
    mask[1, SEQ // 2:] = 0
    with torch.no_grad():
        return pruning.model(ids, attention_mask=mask).logits, small(ids, attention_mask=mask).logits


def _largest_pruned(pruning, get=lambda p: p) -> float:
    """Largest |value| over the pruned elements of every masked parameter (``get``: the weight, or its grad)."""
    params = dict(pruning.model.named_parameters())
    return max(get(params[n]).detach()[~m].abs().max().item() for n, m in pruning.masks.items())


class Probe(transformers.TrainerCallback):
    """Runs after PruningCallback in every event: records what it left behind."""

    def __init__(self, pruning):
        self.pruning = pruning
        self.sparsity: list[float] = []
        self.expected_scores: dict[str, torch.Tensor] = {}
        self.micro_batches = 0
        self.leaked: list[float] = []  # largest |weight| or |grad| of a pruned element seen
        self.autocast: list[bool] = []  # whether the classifier ran under CPU autocast, per training forward
        self._hook = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._hook = self.pruning.model.classifier.register_forward_pre_hook(
            lambda module, inputs: self.autocast.append(torch.is_autocast_enabled("cpu")))

    def on_train_end(self, args, state, control, **kwargs):
        self._hook.remove()

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.micro_batches += 1
        # snip_momentum by hand from the gradients the optimizer is about to use (summed over both micro-batches)
        for name, p in self.pruning.pruners[0].modules.items():
            s = (p.detach() * p.grad.detach()).abs()
            old = self.expected_scores.get(name)
            self.expected_scores[name] = s if old is None else 0.9 * old + s
        if self.pruning.masks:
            self.leaked.append(_largest_pruned(self.pruning, lambda p: p.grad))

    def on_step_end(self, args, state, control, **kwargs):
        self.sparsity.append(self.pruning.sparsity)
        if self.pruning.masks:
            self.leaked.append(_largest_pruned(self.pruning))


def _kept(pruning) -> dict[int, list[int]]:
    return {g: k.tolist() for g, k in pruning.kept_channels.items()}


def test_trainer_prunes_on_optimizer_steps_with_accumulation_clipping_and_bf16(tmp_path):
    pruning = _pruning()
    initial = {k: v.clone() for k, v in pruning.model.state_dict().items()}
    probe = Probe(pruning)
    trainer = _trainer(pruning, tmp_path, [probe], bf16=True)
    trainer.train()

    assert trainer.state.global_step == pruning.global_step == STEPS
    assert probe.micro_batches == STEPS * ACCUMULATE
    assert probe.autocast == [True] * (STEPS * ACCUMULATE)  # bf16 really reached the forward passes
    # the schedule counts optimizer steps: nothing before step 1, growing through step 8, the target from there on
    sched = pruning.pruners[0].scheduler
    assert probe.sparsity[0] == 0.0
    assert probe.sparsity == sorted(probe.sparsity) and probe.sparsity[7] < 0.48
    total = sum(g.size for g in pruning.groups if g.index in pruning._claimed)
    for step in range(1, STEPS):
        assert abs(probe.sparsity[step] - sched.sparsity(step)) <= 1 / total, step
    assert pruning.sparsity == pytest.approx(0.5, abs=1 / total)
    # scores came from the accumulated gradients right before each optimizer step
    scores = pruning.pruners[0].scores
    assert set(scores) == set(probe.expected_scores)
    for name, s in scores.items():
        torch.testing.assert_close(s, probe.expected_scores[name], atol=0, rtol=1e-6)
    # pruned gradients were zero when the optimizer stepped, pruned weights zero after every step
    assert len(probe.leaked) == 2 * (STEPS - 1) and max(probe.leaked) == 0.0  # masks exist from step 1 on
    assert pruning.masks and all((~m).any() for m in pruning.masks.values())
    for name, mask in pruning.masks.items():
        weight = pruning.model.get_parameter(name)
        assert (weight[~mask] == 0).all(), name
        assert not torch.equal(weight[mask], initial[name][mask]), name  # the kept weights did train

    masked, compact = _masked_and_compact(pruning)  # float32 again: the Trainer's autocast wrapper is gone
    torch.testing.assert_close(compact, masked, **EXACT)


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path):
    straight = _pruning()
    _trainer(straight, tmp_path / "a", save_strategy="steps", save_steps=6).train()
    assert (tmp_path / "a" / "checkpoint-6" / STATE_NAME).is_file()
    saved = torch.load(tmp_path / "a" / "checkpoint-6" / STATE_NAME, weights_only=True)
    assert saved["global_step"] == 6 and not all(k.all() for k in saved["kept"].values())  # mid-schedule

    # a second run that resumes at step 6: resume_from_checkpoint=True finds output_dir's last checkpoint
    shutil.copytree(tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6")
    resumed = _pruning()
    trainer = _trainer(resumed, tmp_path / "b", save_strategy="steps", save_steps=6)
    trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == resumed.global_step == STEPS
    assert _kept(resumed) == _kept(straight)
    assert resumed.sparsity == straight.sparsity
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], value, atol=1e-6, rtol=0, msg=name)


class LatestIsWorst(transformers.TrainerCallback):
    """An eval metric that makes the earliest evaluation the best one."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_earliness"] = -state.global_step


def test_best_checkpoint_brings_its_pruning_state(tmp_path):
    """load_best_model_at_end loads the weights of checkpoint-3: its masks and scores must come with them."""
    pruning = _pruning()
    trainer = _trainer(pruning, tmp_path, [LatestIsWorst()], eval_data=Tokens(8, seed=2), max_steps=6,
                       eval_strategy="steps", eval_steps=3, save_strategy="steps", save_steps=3,
                       load_best_model_at_end=True, metric_for_best_model="earliness")
    trainer.train()
    best = tmp_path / "checkpoint-3"
    assert trainer.state.best_model_checkpoint == str(best)
    saved = torch.load(best / STATE_NAME, weights_only=True)
    assert pruning.global_step == 3 and _kept(pruning) == {g: torch.nonzero(k).flatten().tolist()
                                                           for g, k in saved["kept"].items()}
    assert 0 < pruning.sparsity < pruning.pruners[0].scheduler.sparsity(5)  # less pruned than at the last step
    weights = safetensors.torch.load_file(best / "model.safetensors")
    for name, value in pruning.model.state_dict().items():  # the best weights, not masked any further
        assert torch.equal(value, weights[name]), name
    masked, compact = _masked_and_compact(pruning)
    torch.testing.assert_close(compact, masked, **EXACT)


def test_resume_without_the_pruning_state_raises(tmp_path):
    first = _pruning()
    _trainer(first, tmp_path, max_steps=2, save_strategy="steps", save_steps=2).train()
    (tmp_path / "checkpoint-2" / STATE_NAME).unlink()
    with pytest.raises(PruningError, match="resumes at step 2 but no pruning state"):
        _trainer(_pruning(), tmp_path, max_steps=4).train(resume_from_checkpoint=True)


def test_trainer_on_another_model_is_refused(tmp_path):
    pruning = _pruning()
    other = transformers.Trainer(model=_pruning().model, args=_trainer(pruning, tmp_path).args,
                                 train_dataset=Tokens(), callbacks=[PruningCallback(pruning)])
    with pytest.raises(PruningError, match="model=pruning.model"):
        other.train()


def test_ddp_two_processes_prune_the_same_channels(tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tests.test_trainer", str(tmp_path)]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(r["wrapped"] == "DistributedDataParallel" for r in ranks)
    epoch = len(Tokens()) // 2  # each rank reads its own half of every epoch
    assert len(ranks[0]["seen"]) >= epoch and set(ranks[0]["seen"][:epoch]).isdisjoint(ranks[1]["seen"][:epoch])
    assert all(r["global_step"] == STEPS for r in ranks)
    assert ranks[0]["kept"] == ranks[1]["kept"]
    assert ranks[0]["sparsity"] == pytest.approx(0.5, abs=0.01)
    for name, value in ranks[0]["weights"].items():
        torch.testing.assert_close(ranks[1]["weights"][name], value, atol=0, rtol=0, msg=name)
    for r in ranks:
        assert r["leaked"] == 0.0
        torch.testing.assert_close(r["compact"], r["masked"], **EXACT)


def _ddp_worker(out: str) -> None:
    """One rank of the DDP test: the Trainer wraps pruning.model in DistributedDataParallel (gloo)."""
    pruning = _pruning()
    data = Tokens()
    trainer = _trainer(pruning, Path(out) / "trainer", data=data, ddp_backend="gloo")
    trainer.train()
    masked, compact = _masked_and_compact(pruning)
    torch.save({"wrapped": type(trainer.model_wrapped).__name__, "seen": data.seen, "global_step": pruning.global_step,
                "kept": _kept(pruning), "sparsity": pruning.sparsity,
                "weights": {k: v.detach().clone() for k, v in pruning.model.state_dict().items()},
                "leaked": _largest_pruned(pruning), "masked": masked, "compact": compact},
               Path(out) / f"rank{trainer.args.process_index}.pt")


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
