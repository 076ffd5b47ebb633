"""The embedded default job: a small CNN on scikit-learn's digits, end to end.

train dense → prune channels during a short fine-tune (snip_momentum, iterative)
→ compact → ONNX (checked against onnxruntime) → latency table. Everything it needs
ships in installed packages: no downloads.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

__all__ = ["DigitsCNN", "load_digits_split", "train", "accuracy", "run_demo"]


class DigitsCNN(nn.Module):
    """Three conv blocks and a flatten→Linear head for 8x8 grey digits."""

    def __init__(self, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Linear(2 * width * 16, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.features(x), 1))


def load_digits_split(seed: int = 0):
    """scikit-learn's digits (1,797 8x8 images), a stratified 80/20 split, scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


def train(model: nn.Module, x, y, steps: int, lr: float = 0.05, batch: int = 64, seed: int = 0,
          pruning=None, desc: str = "train") -> None:
    """SGD with momentum for ``steps`` steps; with ``pruning``, its hooks run every step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    if pruning is not None:
        pruning.attach(opt)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in tqdm(range(steps), desc=desc, leave=False, disable=None):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        sched.step()
    if pruning is not None:
        pruning.on_train_end()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def run_demo(sparsity: float = 0.5, pruner: str = "snip_momentum", steps: int = 300, finetune_steps: int = 300,
             threads=(1, 2), batch: int = 64, repeat: int = 30, round_to: int = 8, out_dir: str | None = None,
             seed: int = 0) -> dict:
    """Run the whole pipeline and print what a user wants to see; returns the figures."""
    import fxprune

    torch.manual_seed(seed)
    xtr, ytr, xte, yte = load_digits_split(seed)
    model = DigitsCNN()
    train(model, xtr, ytr, steps, seed=seed, desc="dense training")
    dense_acc = accuracy(model, xte, yte)
    print(f"dense model: test accuracy {dense_acc:.2%} on {len(xte)} held-out digits")

    example = (xte[:batch],)
    config = {"pruning_type": pruner, "pattern": "channelx1", "target_sparsity": sparsity,
              "start_step": min(10, finetune_steps // 4), "end_step": finetune_steps // 2,
              "update_frequency_on_step": max(1, finetune_steps // 15),
              "sparsity_decay_type": "cos", "prune_domain": "local", "round_to": round_to}
    pruning = fxprune.compile(model, example, config)
    print(f"captured and grouped in {pruning.captured.seconds + pruning.grouping.seconds:.2f} s: "
          f"{len(pruning.groups)} channel groups")
    train(pruning.model, xtr, ytr, finetune_steps, lr=0.02, seed=seed + 1, pruning=pruning,
          desc=f"{pruner} pruning fine-tune")
    pruned_acc = accuracy(pruning.model, xte, yte)
    small = pruning.compact()
    report = pruning.report()
    print(report)
    print(f"pruned model ({pruning.sparsity:.0%} of channels removed): test accuracy {pruned_acc:.2%} "
          f"(compact == masked, max abs error {pruning.compact_error:.1e})")

    out_dir = out_dir or tempfile.mkdtemp(prefix="fxprune-demo-")
    os.makedirs(out_dir, exist_ok=True)
    dense_path, small_path = os.path.join(out_dir, "dense.onnx"), os.path.join(out_dir, "compact.onnx")
    for label, module, path in (("dense", pruning.captured.graph_module, dense_path), ("compact", small, small_path)):
        result = fxprune.export_onnx(module, path, example)  # with its own progress bar on a terminal
        print(f"{label} ONNX: {path} ({result.size_bytes / 1e6:.2f} MB, onnxruntime max abs error "
              f"{result.max_abs_error:.1e})")
    table = fxprune.benchmark({"dense": dense_path, "compact": small_path}, threads=tuple(threads), repeat=repeat,
                              inputs={_input_name(dense_path): example[0].numpy()},
                              macs={"dense": report.macs_before, "compact": report.macs_after})
    print(f"\nonnxruntime latency, batch {batch}:")
    print(table)
    return {"dense_accuracy": dense_acc, "pruned_accuracy": pruned_acc, 
            "report": report, "benchmark": table, "sparsity": pruning.sparsity}


def _input_name(path: str) -> str:
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0].name
