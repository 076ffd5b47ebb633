"""Checks written in the tests, independent of the ones fxprune runs itself.

``Pruning.compact()`` compares the compact model with the masked one on the example inputs
(and on the example grown by one along its dynamic dims), so re-reading ``compact_error`` or
re-running the example checks nothing new: these run both models on inputs it never saw.
"""

from __future__ import annotations

import torch
import torch.utils._pytree as pytree


def tensors(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def fresh_like(inputs: tuple, seed: int = 12345) -> tuple:
    """Same shapes and dtypes as ``inputs``, new values: floats ~ N(0, 1), integers (token ids, masks)
    uniform over the example's own [min, max], bools copied."""
    g = torch.Generator().manual_seed(seed)

    def draw(t):
        if not isinstance(t, torch.Tensor) or t.dtype == torch.bool:
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype)
        return torch.randint(int(t.min()), int(t.max()) + 1, t.shape, generator=g, dtype=t.dtype)

    fresh = pytree.tree_map(draw, inputs)
    assert any(not torch.equal(a, b) for a, b in zip(tensors(inputs), tensors(fresh))), "no input changed"
    return fresh


def assert_compact_matches_masked(pruning, small: torch.nn.Module, inputs: tuple, *, atol: float,
                                  rtol: float) -> None:
    """``small`` computes what the masked model (``pruning.model`` in eval mode) computes on ``inputs``."""
    model = pruning.model
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref, out = tensors(model(*inputs)), tensors(small(*inputs))
    finally:
        model.train(was_training)
    assert ref and len(out) == len(ref), (len(out), len(ref))
    for i, (o, r) in enumerate(zip(out, ref)):
        torch.testing.assert_close(o, r, atol=atol, rtol=rtol, msg=lambda m, i=i: f"output {i}: {m}")


def n_params(module: torch.nn.Module) -> int:
    """Parameter elements, tied parameters once (``parameters()`` deduplicates them)."""
    return sum(p.numel() for p in module.parameters())


def assert_onnx_matches(path, module: torch.nn.Module, inputs: tuple, *, atol: float, rtol: float) -> None:
    """onnxruntime on the file at ``path`` computes what ``module`` computes on ``inputs`` (fed in order)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    arrays = [t.numpy() for t in tensors(inputs)]
    assert len(session.get_inputs()) == len(arrays), [i.name for i in session.get_inputs()]
    got = session.run(None, {meta.name: a for meta, a in zip(session.get_inputs(), arrays)})
    with torch.no_grad():
        want = tensors(module(*inputs))
    assert want and len(got) == len(want), (len(got), len(want))
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(torch.from_numpy(g), w, atol=atol, rtol=rtol, msg=lambda m, i=i: f"output {i}: {m}")
