"""Op coverage of the group pass on the benchmark models: nodes handled by a rule vs blocking.

    python benchmarks/op_coverage.py
"""

from __future__ import annotations

import torch
import transformers

import fxprune

MODELS = {
    "resnet50": (lambda: transformers.ResNetModel(transformers.ResNetConfig()), lambda: (torch.randn(1, 3, 224, 224),)),
    "convnext-tiny": (lambda: transformers.ConvNextModel(transformers.ConvNextConfig()), lambda: (torch.randn(1, 3, 224, 224),)),
    "mobilenetv2": (lambda: transformers.MobileNetV2Model(transformers.MobileNetV2Config()), lambda: (torch.randn(1, 3, 224, 224),)),
    "vit-base": (lambda: transformers.ViTModel(transformers.ViTConfig()), lambda: (torch.randn(1, 3, 224, 224),)),
    "bert-base": (lambda: transformers.BertModel(transformers.BertConfig()), lambda: (torch.randint(0, 30522, (1, 128)),)),
    "gpt2": (lambda: transformers.GPT2Model(transformers.GPT2Config(use_cache=False)), lambda: (torch.randint(0, 50257, (1, 128)),)),
    "llama (4 layers, GQA)": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
        use_cache=False)), lambda: (torch.randint(0, 32000, (1, 128)),)),
}


def main() -> None:
    print("| model | op nodes | with a rule | blocking (no rule) | blocking ops | groups |")
    print("|---|---:|---:|---:|---|---:|")
    for name, (build, inputs) in MODELS.items():
        torch.manual_seed(0)
        e = fxprune.explain(build().eval(), inputs())
        handled, blocking = sum(e.ops_handled.values()), sum(e.ops_blocking.values())
        ops = ", ".join(f"{op} ×{n}" for op, n in e.ops_blocking.most_common()) or "–"
        print(f"| {name} | {handled + blocking} | {handled} | {blocking} | {ops} | {len(e.groups)} |")


if __name__ == "__main__":
    main()
