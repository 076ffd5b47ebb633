"""Compaction is exact on random architectures (see tests/generated.py).

For every drawn architecture and random channel masks at a random sparsity:
compile -> set_kept -> compact, then

(a) compact outputs equal masked outputs: max abs error <= ATOL * max(1, max|y|)
    (1e-4 in float32, 1e-9 in float64; the scale is the one compact() itself uses), at the
    example's batch and at a drawn one (the batch is captured dynamic);
(b) onnxruntime == torch on the compact model at the drawn batch (float32, when ``onnx`` is drawn);
(c) the compact model has no more parameters and MACs than the dense graph
    (strictly fewer parameters when a channel was removed);
(d) the user's model is untouched.

Profiles (env FXPRUNE_HYPOTHESIS_PROFILE): ``ci`` (default; derandomized, no
example database, well under a minute) and ``long`` (thousands of examples, uses
the default .hypothesis database so failures replay). With FXPRUNE_GENERATED_LOG
set to a path, each finished example appends one line there (for long runs):

    FXPRUNE_HYPOTHESIS_PROFILE=long python -m pytest -q tests/test_generated.py --hypothesis-show-statistics
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import HealthCheck, Phase, assume, event, example, given, settings
from hypothesis import strategies as st

import fxprune
from fxprune.norms import STATE
from fxprune.passes.macs import count_macs, count_params
from tests.checks import assert_onnx_matches
from tests.generated import architectures, build

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]  # no 'explain': minutes per failure
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET, phases=_PHASES, print_blob=True)
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=_QUIET,
                          phases=_PHASES, print_blob=True)
PROFILE = settings.get_profile(os.environ.get("FXPRUNE_HYPOTHESIS_PROFILE", "ci"))
LOG = os.environ.get("FXPRUNE_GENERATED_LOG")


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def random_masks(groups, sparsity: float, seed: int) -> dict[int, np.ndarray]:
    """Per group a random keep mask (drops each channel with prob. ``sparsity``) that keeps
    at least one channel of the group and of each of its parts."""
    rng = np.random.default_rng(seed)
    kept = {}
    for g in groups:
        keep = rng.random(g.size) >= sparsity
        if not keep.any():
            keep[rng.integers(g.size)] = True
        for part in g.parts:
            if not keep[part].any():
                keep[rng.choice(part)] = True
        kept[g.index] = keep
    if all(k.all() for k in kept.values()):  # compact() wants something pruned: drop one channel if any can go
        for i in rng.permutation(len(groups)):
            g = groups[i]
            for c in rng.permutation(g.size):
                if g.size > 1 and all(len(part) > 1 or part[0] != c for part in g.parts):
                    kept[g.index][c] = False
                    return kept
    return kept


def check_exact(arch: dict, sparsity: float, mask_seed: int, dtype=torch.float32, atol: float = 1e-4,
                onnx: bool = False, batch: int = 3):
    """compile -> random masks -> compact, and check (a)-(d), (a) at the example's batch and at ``batch``.

    Returns the Pruning and the compact model (None when no channel can be removed)."""
    model, x = build(arch, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    p = fxprune.compile(model, x, {"target_sparsity": 0.5, "prune_domain": "local"})
    kept = random_masks(p.groups, sparsity, mask_seed)
    p.set_kept(kept)
    if all(k.all() for k in kept.values()):  # nothing can be pruned: compact() says so
        with pytest.raises(fxprune.PruningError, match="nothing is pruned|no group was prunable"):
            p.compact()
        return p, None
    small = p.compact(atol=atol)

    # (a) compact == masked, checked here too, with compact()'s own scale; the batch is dynamic, so at another too
    other = torch.randn(batch, *x[0].shape[1:], generator=torch.Generator().manual_seed(mask_seed % 2**31),
                        dtype=torch.float64).to(dtype)
    for inputs in (x, (other,)):
        with torch.no_grad():
            masked, out = _leaves(p.model(*inputs)), _leaves(small(*inputs))
        assert len(masked) == len(out)
        for m, o in zip(masked, out):
            assert m.shape == o.shape and o.dtype == dtype
            err = float((m.double() - o.double()).abs().max())
            assert err <= atol * max(1.0, float(m.abs().max())), (err, p.compact_error, inputs[0].shape)
    # (c) no larger than the dense graph; strictly fewer parameters once a channel is gone
    dense = p.captured.graph_module
    params_dense, params_small = count_params(dense), count_params(small)
    assert params_small <= params_dense
    if any(not k.all() for k in kept.values()):
        assert params_small < params_dense
    assert count_macs(small, x) <= count_macs(dense, x)
    # (d) the user's model is untouched
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    # (b) ONNX Runtime == torch, at the second input (export_onnx itself checks the example)
    if onnx:
        with tempfile.TemporaryDirectory() as d:
            path = fxprune.export_onnx(small, Path(d) / "small.onnx", x).path
            scale = max(1.0, max(float(o.abs().max()) for o in out))  # out: the compact outputs at `other`
            assert_onnx_matches(path, small, (other,), atol=1e-4 * scale, rtol=0)
    return p, small


def _record(p, small) -> None:
    """Statistics (pytest --hypothesis-show-statistics); models with nothing to prune are not counted as examples."""
    if small is None:
        event("nothing prunable")
    assume(small is not None)  # spend the example budget on models with prunable channels
    event(f"groups: {min(len(p.groups), 5)}{'+' if len(p.groups) >= 5 else ''}")
    event(f"channels removed: {'<25%' if p.sparsity < 0.25 else '25-75%' if p.sparsity <= 0.75 else '>75%'}")
    switched = sum(STATE in m.__dict__ for m in p.model.modules())
    event(f"norm layers computing over kept channels only: {min(switched, 2)}{'+' if switched >= 2 else ''}")
    if LOG:
        with open(LOG, "a") as f:
            f.write(f"groups={len(p.groups)} sparsity={p.sparsity:.2f} err={p.compact_error:.2e}\n")


# Always run (explicit phase): stem, depthwise + SE + GroupNorm residual block with projection, uneven split,
# grouped conv, cat, slice, sigmoid gate, pooling, channels-last linear + LayerNorm, linear SE, two heads.
RICH = {"input": (1, 3, 16, 12), "seed": 7, "program": [
    ("conv", {"cout": 16, "k": 3, "stride": 2, "groups": 1, "bias": False, "norm": "bn", "act": "relu"}),
    ("block", {"body": [
        ("conv", {"cout": 16, "k": 3, "stride": 1, "groups": 16, "bias": False, "norm": "bn", "act": "hardswish"}),
        ("se", {"r": 4, "via": "conv"}),
        ("conv", {"cout": 8, "k": 1, "stride": 1, "groups": 1, "bias": True, "norm": None, "act": None}),
        ("groupnorm", {"groups": 4})], "residual": "proj"}),
    ("dup", {}),
    ("split", {"sizes": [3, 5], "chunk": False}),
    ("swap", {}),
    ("conv", {"cout": 6, "k": 3, "stride": 1, "groups": 3, "bias": True, "norm": None, "act": "gelu"}),
    ("cat", {}),
    ("slice", {"start": 1, "stop": 9, "step": 1}),
    ("mul", {"gate": True}),
    ("pool", {"fn": "max", "k": 2}),
    ("to_nhwc", {}),
    ("linear", {"fout": 12, "bias": True}),
    ("layernorm", {"affine": True}),
    ("to_nchw", {}),
    ("se", {"r": 5, "via": "linear"}),
    ("dup", {}),
    ("head", {"fout": 10}),
    ("swap", {}),
    ("gpool", {}),
    ("linear", {"fout": 7, "bias": True}),
]}

sparsities = st.floats(0.0, 0.95)
mask_seeds = st.integers(0, 2**32 - 1)
batches = st.integers(1, 6)  # the batch of the second check: compact graphs take any batch


@settings(PROFILE)
@example(arch=RICH, sparsity=0.5, mask_seed=1, onnx=True, batch=5)
@given(arch=architectures(), sparsity=sparsities, mask_seed=mask_seeds, onnx=st.integers(0, 3).map(lambda i: i == 3),
       batch=batches)
def test_compact_equals_masked_float32(arch, sparsity, mask_seed, onnx, batch):
    """ONNX export (~2 s) runs on about a quarter of the examples."""
    _record(*check_exact(arch, sparsity, mask_seed, torch.float32, 1e-4, onnx=onnx, batch=batch))


@settings(PROFILE)
@example(arch=RICH, sparsity=0.5, mask_seed=1, batch=1)
@given(arch=architectures(), sparsity=sparsities, mask_seed=mask_seeds, batch=batches)
def test_compact_equals_masked_float64(arch, sparsity, mask_seed, batch):
    _record(*check_exact(arch, sparsity, mask_seed, torch.float64, 1e-9, batch=batch))
