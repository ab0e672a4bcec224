"""Realistic gradient sets for benchmarks: layer shapes of real models, random N(0, s) values."""

from __future__ import annotations

import torch


def gpt2_124m_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """The 148 parameter shapes of GPT-2 small (124M parameters)."""
    d, v, ctx, layers = 768, 50257, 1024, 12
    shapes = [("wte.weight", (v, d)), ("wpe.weight", (ctx, d))]
    for i in range(layers):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)), (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)), (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)), (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)), (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)), (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)), (h + "mlp.c_proj.bias", (d,)),
        ]
    return shapes + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def llama_7b_shapes(layers: int = 32) -> list[tuple[str, tuple[int, ...]]]:
    """Llama-2-7B parameter shapes with ``layers`` decoder layers (32 in the real model)."""
    d, f, v = 4096, 11008, 32000
    shapes = [("embed_tokens.weight", (v, d))]
    for i in range(layers):
        h = f"layers.{i}."
        shapes += [(h + f"self_attn.{p}_proj.weight", (d, d)) for p in "qkvo"]
        shapes += [(h + "mlp.gate_proj.weight", (f, d)), (h + "mlp.up_proj.weight", (f, d)),
                   (h + "mlp.down_proj.weight", (d, f)),
                   (h + "input_layernorm.weight", (d,)), (h + "post_attention_layernorm.weight", (d,))]
    return shapes + [("norm.weight", (d,)), ("lm_head.weight", (v, d))]


def make(shapes, dtype=torch.float32, device="cpu", seed=0) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(s, dtype=dtype, device=device, generator=g) * 1e-3 for _, s in shapes]


def sets(quick: bool = False) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """The named parameter sets of the CPU benchmark (small versions with ``quick``)."""
    if quick:
        return {"gpt2-like (tiny)": gpt2_124m_shapes()[2:14], "1000 small": [(f"p{i}", (97,)) for i in range(1000)],
                "one 1e6": [("x", (1_000_000,))]}
    return {
        "gpt2-124M (148 tensors)": gpt2_124m_shapes(),
        "10,000 small (97..1000 elts)": [(f"p{i}", (97 + (i * 37) % 904,)) for i in range(10_000)],
        "one 1e8 tensor": [("x", (100_000_000,))],
    }
