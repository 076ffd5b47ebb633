"""Compact models that run at other shapes than the example: the graph, its .pt2 and its ONNX file.

Every model is compiled on one shape (batch 1, and sequence 16 for text) and then run at
two others. At each: compact == masked within 1e-4 x max(1, |y|), and the .pt2 and the
ONNX file (through onnxruntime) equal the masked model within the same tolerance.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import transformers
from torch.export import Dim

import fxprune
from tests.models import ARCHITECTURES, hf_models

T = transformers
ATOL = 1e-4


def _first(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()))


def _close(ref: torch.Tensor, out, what: str) -> None:
    out = torch.as_tensor(out)
    assert tuple(out.shape) == tuple(ref.shape), what
    err = float((ref.double() - out.double()).abs().max())
    assert err <= ATOL * max(1.0, float(ref.abs().max())), f"{what}: {err}"


def _check_at_shapes(pruning, small, tmp_path, shapes, make_inputs) -> None:
    """compact, .pt2 and ONNX == masked model at each of ``shapes``."""
    args, kwargs = pruning.example_inputs, pruning.example_kwargs
    fxprune.save_compact(small, tmp_path / "small.pt2", args, kwargs)
    loaded = fxprune.load_compact(tmp_path / "small.pt2")
    fxprune.export_onnx(small, tmp_path / "small.onnx", args, kwargs)
    session = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for shape in shapes:
        x_args, x_kwargs = make_inputs(*shape)
        with torch.no_grad():
            ref = _first(pruning.model(*x_args, **x_kwargs))
            _close(ref, _first(small(*x_args, **x_kwargs)), f"compact at {shape}")
            _close(ref, _first(loaded(*x_args, **x_kwargs)), f".pt2 at {shape}")
        feed = dict(zip(names, [t.numpy() for t in (*x_args, *x_kwargs.values())]))
        _close(ref, session.run(None, feed)[0], f"ONNX at {shape}")


IMAGE_MODELS = {**ARCHITECTURES, **hf_models()}


@pytest.mark.parametrize("name", sorted(IMAGE_MODELS))
def test_image_models_compiled_at_batch_1_run_at_3_and_8(name, tmp_path):
    factory, inputs = IMAGE_MODELS[name]
    (x,) = inputs()
    x1 = x[:1]
    pruning = fxprune.compile(factory(), (x1,), {"target_sparsity": 0.5, "prune_domain": "local"})
    small = pruning.prune().compact()
    assert pruning.sparsity > 0.3
    gen = torch.Generator().manual_seed(1)
    _check_at_shapes(pruning, small, tmp_path, [(3,), (8,)],
                     lambda b: ((torch.randn(b, *x.shape[1:], generator=gen),), {}))


def _text(model, vocab=100):
    return lambda b, s: ((torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(b * s)),), {})


TEXT = {
    "bert": lambda: T.BertModel(T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=128, vocab_size=100)),
    "gpt2": lambda: T.GPT2Model(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=128, vocab_size=100,
                                             use_cache=False, bos_token_id=0, eos_token_id=0)),
    "llama-gqa": lambda: T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                          num_key_value_heads=2, intermediate_size=128,
                                                          vocab_size=100, use_cache=False)),
}


@pytest.mark.parametrize("name", sorted(TEXT))
def test_text_models_compiled_at_1x16_run_at_3x37_and_8x128(name, tmp_path):
    torch.manual_seed(0)
    model = TEXT[name]().eval()
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    dims = {"input_ids": {0: Dim("batch"), 1: Dim("seq", max=256)}}
    pruning = fxprune.compile(model, (ids,), {"target_sparsity": 0.5, "prune_domain": "local"}, dynamic_shapes=dims)
    heads = [g for g in pruning.groups if g.size in (2, 4)]
    assert len(heads) == 2  # heads still prune with a dynamic sequence
    small = pruning.prune().compact()
    _check_at_shapes(pruning, small, tmp_path, [(3, 37), (8, 128)], _text(model))


VISION_TRANSFORMERS = {
    "vit": lambda: T.ViTModel(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=128, image_size=32, patch_size=8)),
    "swin": lambda: T.SwinForImageClassification(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16,
                                                              depths=[1, 1], num_heads=[2, 4], window_size=4)),
}


@pytest.mark.parametrize("name", sorted(VISION_TRANSFORMERS))
def test_vision_transformers_compiled_at_batch_1_run_at_3_and_8(name, tmp_path):
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = VISION_TRANSFORMERS[name]().eval()
    config = {"target_sparsity": 0.5, "prune_domain": "local"}
    pruning = fxprune.compile(model, (pixels,), config)
    static = fxprune.compile(model, (pixels,), config, dynamic_shapes={})
    assert [g.describe() for g in pruning.groups] == [g.describe() for g in static.groups]  # a dynamic batch costs no group
    small = pruning.prune().compact()
    gen = torch.Generator().manual_seed(2)
    _check_at_shapes(pruning, small, tmp_path, [(3,), (8,)],
                     lambda b: ((torch.randn(b, 3, 32, 32, generator=gen),), {}))


def test_keyword_inputs_become_named_onnx_inputs_with_dynamic_axes(tmp_path):
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=128, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    extra = {"attention_mask": torch.ones(1, 16, dtype=torch.long), "token_type_ids": torch.zeros(1, 16, dtype=torch.long)}
    batch, seq = Dim("batch"), Dim("seq", max=256)
    dims = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}, "token_type_ids": {0: batch, 1: seq}}
    pruning = fxprune.compile(model, (ids,), {"target_sparsity": 0.5, "prune_domain": "local"},
                              example_kwargs=extra, dynamic_shapes=dims)
    small = pruning.prune().compact()
    fxprune.export_onnx(small, tmp_path / "bert.onnx", (ids,), extra)
    graph = onnx.load(str(tmp_path / "bert.onnx")).graph
    axes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert axes == {"input_ids": ["batch", "input_ids_dim1"], "attention_mask": ["batch", "input_ids_dim1"],
                    "token_type_ids": ["batch", "input_ids_dim1"]}
    # keyword inputs written in another order than at capture pair with the same dims
    fxprune.export_onnx(small, tmp_path / "bert_reordered.onnx", (ids,), dict(reversed(list(extra.items()))))
    graph = onnx.load(str(tmp_path / "bert_reordered.onnx")).graph
    assert {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input} == axes

    def padded(b, s):
        mask = torch.ones(b, s, dtype=torch.long)
        mask[:, s // 2:] = 0  # padding changes the output: the mask really reaches the graph
        return ((torch.randint(0, 100, (b, s)),),
                {"attention_mask": mask, "token_type_ids": torch.zeros(b, s, dtype=torch.long)})

    _check_at_shapes(pruning, small, tmp_path, [(3, 37), (8, 128)], padded)
    fxprune.save_compact(small, tmp_path / "bert_reordered.pt2", (ids,), dict(reversed(list(extra.items()))))
    (xb,), kwb = padded(3, 37)
    with torch.no_grad():
        _close(pruning.model(xb, **kwb).logits, fxprune.load_compact(tmp_path / "bert_reordered.pt2")(xb, **kwb)[0],
               ".pt2 exported with the keywords reordered, at (3, 37)")
    (x,), kw = padded(2, 20)
    with torch.no_grad():  # padding changes the output, so the checks above saw the mask
        assert (pruning.model(x, **kw).logits - pruning.model(x).logits).abs().max() > 1e-6


def test_keyword_flags_in_forwards_kwargs_fall_back_to_static_with_the_reason():
    """transformers 5 takes return_dict through **kwargs, which torch.export cannot pair with dynamic dims."""
    model = T.BertForSequenceClassification(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=64, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (1, 8))
    with pytest.warns(UserWarning, match=r"keyword inputs fall into forward's \*\*kwargs \(return_dict\)"):
        pruning = fxprune.compile(model, (ids,), {"target_sparsity": 0.5}, example_kwargs={"return_dict": False})
    small = pruning.prune().compact()
    assert isinstance(small(ids, return_dict=False), tuple)


class FixedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)
        self.register_buffer("offset", torch.zeros(2, 16))

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x) + self.offset))  # the buffer fixes the batch at 2


def test_a_model_that_fixes_the_batch_is_captured_static_with_the_line_named():
    with pytest.warns(UserWarning, match=r"(?s)batch dim could not be captured as dynamic.*test_dynamic_shapes\.py.*"
                                         r"self\.offset"):
        pruning = fxprune.compile(FixedBatch(), (torch.randn(2, 8),), {"target_sparsity": 0.5})
    small = pruning.prune().compact()
    with pytest.raises(Exception, match="Guard failed|Expected input"):
        small(torch.randn(3, 8))


def test_empty_dynamic_shapes_capture_at_the_example_shapes():
    factory, inputs = ARCHITECTURES["PlainCNN"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruning = fxprune.compile(factory(), inputs(), {"target_sparsity": 0.5}, dynamic_shapes={})
    small = pruning.prune().compact()
    (x,) = inputs()
    assert small(x).shape[0] == x.shape[0]
    with pytest.raises(Exception, match="Guard failed|Expected input"):
        small(torch.cat([x, x]))


def test_compact_graph_refuses_training_mode():
    factory, inputs = ARCHITECTURES["ResNetBasic"]
    small = fxprune.compile(factory(), inputs(), {"target_sparsity": 0.5}).prune().compact()
    with pytest.raises(fxprune.CompactionError, match="captured in eval mode.*compact_eager"):
        small.train()
    assert small.eval() is small and not small.training
    with pytest.raises(fxprune.CompactionError, match="captured in eval mode"):
        __import__("copy").deepcopy(small).train()


def test_onnx_of_the_dense_capture_is_dynamic_too(tmp_path):
    factory, inputs = ARCHITECTURES["MobileNetV2Like"]
    (x,) = inputs()
    pruning = fxprune.compile(factory(), (x,), {"target_sparsity": 0.5})
    fxprune.export_onnx(pruning.captured.graph_module, tmp_path / "dense.onnx", (x,))
    session = ort.InferenceSession(str(tmp_path / "dense.onnx"), providers=["CPUExecutionProvider"])
    xb = torch.randn(5, *x.shape[1:])
    with torch.no_grad():
        ref = pruning.model(xb).numpy()
    np.testing.assert_allclose(session.run(None, {"x": xb.numpy()})[0], ref, atol=1e-4)


def test_an_nn_sequential_keeps_its_dynamic_batch_in_the_pt2_and_onnx_files(tmp_path):
    # torch.export names Sequential's `input` argument `input_1` in the graph; the re-export binds `input`
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16 * 6 * 6, 5))
    x1 = torch.randn(1, 3, 10, 10)
    pruning = fxprune.compile(model.eval(), (x1,), {"target_sparsity": 0.5})
    small = pruning.prune().compact()
    assert pruning.sparsity > 0.3
    _check_at_shapes(pruning, small, tmp_path, [(3,), (8,)], lambda b: ((torch.randn(b, 3, 10, 10),), {}))
    (axis, *_), = [i.shape for i in ort.InferenceSession(str(tmp_path / "small.onnx")).get_inputs()]
    assert axis == "batch"


class NestedInputs(nn.Module):
    """Takes a tuple holding a tensor and a dict of tensors: the capture's placeholders are pair_0 and pair_1_z,
    and forward's one argument is pair."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 4), nn.Linear(8, 16)

    def forward(self, pair):
        x, extra = pair
        return self.b(torch.relu(self.a(x)) + self.c(extra["z"]))


def _nested(batch: int) -> tuple:
    return ((torch.randn(batch, 8), {"z": torch.randn(batch, 8)}),)


def test_tuple_and_dict_inputs_keep_their_dynamic_batch_in_the_pt2_and_onnx_files(tmp_path):
    pruning = fxprune.compile(NestedInputs().eval(), _nested(1), {"target_sparsity": 0.5})
    small = pruning.prune().compact()
    assert pruning.sparsity > 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "accepts only the example's shapes" warning
        fxprune.save_compact(small, tmp_path / "small.pt2", _nested(1))
        fxprune.export_onnx(small, tmp_path / "small.onnx", _nested(1))
    session = ort.InferenceSession(str(tmp_path / "small.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in session.get_inputs()] == [("pair_0", ["batch", 8]), ("pair_1_z", ["batch", 8])]
    loaded = fxprune.load_compact(tmp_path / "small.pt2")
    for batch in (3, 8):
        args = _nested(batch)
        (x, extra), = args
        with torch.no_grad():
            ref = pruning.model(*args)
            _close(ref, small(*args), f"compact at batch {batch}")
            _close(ref, loaded(*args), f".pt2 at batch {batch}")
        _close(ref, session.run(None, {"pair_0": x.numpy(), "pair_1_z": extra["z"].numpy()})[0],
               f"ONNX at batch {batch}")


def test_dims_that_bind_to_no_argument_are_a_warning_not_a_silent_static_export(tmp_path, monkeypatch):
    # where the graph's input tree cannot place the dims (a graph without torch.export's input tree),
    # they are matched by argument name; pair_0 and pair_1_z match none of forward's
    small = fxprune.compile(NestedInputs().eval(), _nested(1), {"target_sparsity": 0.5}).prune().compact()
    monkeypatch.setattr(fxprune.passes.shapes, "_spec_by_input_tree", lambda *a: None)
    with pytest.warns(UserWarning, match=r"dynamic dims recorded at capture \(pair_0, pair_1_z\) match no argument "
                                         r"of GraphModule.forward \(pair\), so this export accepts only the example"):
        fxprune.export_onnx(small, tmp_path / "small.onnx", _nested(1))
    assert [i.shape for i in ort.InferenceSession(str(tmp_path / "small.onnx")).get_inputs()] == [[1, 8], [1, 8]]
