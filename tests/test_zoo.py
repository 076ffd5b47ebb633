"""Full-size model zoo (slow; `python -m pytest -m slow`): default HF configs, random init.

Each model: compile, 50% channels one-shot, compact == masked (<= 1e-4 x output scale).
"""

from __future__ import annotations

import pytest
import torch
import transformers

import fxprune

pytestmark = pytest.mark.slow


def _image():
    return (torch.randn(1, 3, 224, 224),)


ZOO = {
    "resnet50": (lambda: transformers.ResNetModel(transformers.ResNetConfig()), _image),
    "convnext-tiny": (lambda: transformers.ConvNextModel(transformers.ConvNextConfig()), _image),
    "mobilenetv2": (lambda: transformers.MobileNetV2Model(transformers.MobileNetV2Config()), _image),
    "vit-base": (lambda: transformers.ViTModel(transformers.ViTConfig()), _image),
    "bert-base": (lambda: transformers.BertModel(transformers.BertConfig()),
                  lambda: (torch.randint(0, 30522, (1, 128)),)),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_compacts_exactly(name):
    torch.manual_seed(0)
    build, inputs = ZOO[name]
    model, x = build().eval(), inputs()
    pruning = fxprune.compile(model, x, {"target_sparsity": 0.5, "prune_domain": "local", "round_to": 8})
    assert pruning.captured.seconds + pruning.grouping.seconds < 10
    pruning.prune()
    pruning.compact()
    report = pruning.report()
    assert report.macs_ratio > 1.5
    assert pruning.sparsity >= 0.45


HIDDEN_ZOO = {
    "convnext-tiny": ZOO["convnext-tiny"],
    "bert-base-cls": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig()),
                      ZOO["bert-base"][1]),
}


@pytest.mark.parametrize("name", sorted(HIDDEN_ZOO))
def test_zoo_hidden_size_compacts_exactly(name):
    """Full-size models with the norm-spanned channels pruned too (prune_hidden_size)."""
    torch.manual_seed(0)
    build, inputs = HIDDEN_ZOO[name]
    model, x = build().eval(), inputs()
    pruning = fxprune.compile(model, x, {"target_sparsity": 0.25, "prune_domain": "local", "round_to": 8,
                                         "prune_hidden_size": True})
    hidden = [g for g in pruning.groups if g.normalized]
    assert hidden
    pruning.prune()
    pruning.compact()  # raises if compact != masked beyond 1e-4 x output scale
    assert all(len(pruning.kept_channels[g.index]) < g.size for g in hidden)
    assert pruning.report().params_ratio > 1.3
