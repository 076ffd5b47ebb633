"""Sanity checks for the shared model fixtures in ``tests/models.py``.

Every architecture must run on its example inputs, produce finite outputs and
be capturable with ``torch.export.export(..., strict=False)`` (the capture path
fxprune uses), with the exported program reproducing the eager outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils._pytree as pytree

from tests.models import ARCHITECTURES, hf_models

_ALL = {**ARCHITECTURES, **hf_models()}  # transformers is a test dependency: missing, this fails


def _tensors(out) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves(out)
    if hasattr(out, "to_tuple") and not any(isinstance(t, torch.Tensor) for t in leaves):
        leaves = pytree.tree_leaves(out.to_tuple())  # ModelOutput without pytree registration
    return [t for t in leaves if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", sorted(_ALL))
def test_model_runs_and_exports(name):
    make_model, make_inputs = _ALL[name]
    model = make_model()
    inputs = make_inputs()

    assert isinstance(inputs, tuple)
    assert not model.training, "factories must return models in eval mode"

    # deterministic construction
    other = make_model()
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), f"{name}: factory is not deterministic ({k})"

    with torch.no_grad():
        eager = _tensors(model(*inputs))
    assert eager, f"{name}: no tensor outputs"
    for t in eager:
        assert torch.isfinite(t).all(), f"{name}: non-finite output"

    ep = torch.export.export(model, inputs, strict=False)
    with torch.no_grad():
        exported = _tensors(ep.module()(*inputs))
    assert len(exported) == len(eager)
    for a, b in zip(eager, exported):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_norms_are_randomized():
    # BatchNorm must not be an identity in the fixtures.
    model = ARCHITECTURES["ResNetBasic"][0]()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert (bn.running_mean > 0).all() and (bn.running_var > 0).all()
        assert (bn.weight > 0).all() and (bn.bias > 0).all()
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
