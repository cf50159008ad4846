"""Forward FLOPs in the papers' convention, attention included, plus parameters.

Convention (DiT, ViViT and fvcore alike): forward pass only, one fused
multiply-add = one flop ("MAC" counting), batch 1.  fvcore's ``FlopCountAnalysis``
counts matmuls / linears / convs but silently skips
``aten::scaled_dot_product_attention`` (and torch 2.13's ``FlopCounterMode`` counts
zero for it on CPU).  We give fvcore a handle for every attention op, so
attention-heavy designs are not made to look cheap.  Element-wise ops (add, mul,
softmax, activations) carry no multiply-adds of note and are deliberately left at
zero, as in the papers; anything else fvcore cannot count is reported in
``unsupported_ops`` and the registry-wide tests fail on it.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn

FLOP_CONVENTION = "fwd, batch 1, 1 multiply-add = 1 flop (fvcore MAC), attention matmuls included"

# ops that carry no multiply-add work worth counting (element-wise, indexing, shape)
NO_MAC_OPS = frozenset(
    "aten::" + op for op in """
    add add_ sub sub_ rsub mul mul_ div div_ neg exp log sin cos sqrt rsqrt pow tanh sigmoid
    silu gelu relu softmax log_softmax sum mean amax max min clamp clamp_min where
    embedding index index_select gather scatter scatter_add masked_fill masked_fill_ fill_
    zeros_like ones_like full_like new_zeros new_ones rand rand_like randn_like randint lt gt le ge eq ne
    logical_and logical_or logical_not bitwise_not floor ceil round remainder floor_divide abs
    cumsum argmax argmin topk sort argsort repeat_interleave repeat dropout feature_dropout
    lift_fresh __or__ __and__
    unbind chunk split cat stack expand_as erf erfinv lerp square any all nonzero addcmul addcdiv
    unfold
    """.split())


def _shape(val) -> list[int]:
    from fvcore.nn.jit_handles import get_shape
    return get_shape(val)


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> Counter:
    """softmax(q k^T) v: B*H*Lq*Lk*D MACs for q k^T plus B*H*Lq*Lk*Dv for the weighted sum."""
    q, k, v = (_shape(x) for x in inputs[:3])
    *batch, lq, d = q
    lk, dv = k[-2], v[-1]
    b = 1
    for n in batch:
        b *= n
    return Counter({"attention": b * lq * lk * (d + dv)})


def baddbmm_flop_jit(inputs: list[Any], outputs: list[Any]) -> Counter:
    a, b = _shape(inputs[1]), _shape(inputs[2])
    return Counter({"bmm": a[0] * a[1] * a[2] * b[2]})


ATTENTION_OPS = (
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)
EXTRA_HANDLES = {**{op: sdpa_flop_jit for op in ATTENTION_OPS}, "aten::baddbmm": baddbmm_flop_jit,
                 # normalisation is element-wise work: no multiply-adds counted (as in the papers)
                 "aten::layer_norm": None, "aten::group_norm": None}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, inputs: tuple) -> dict:
    """Flat dict: params, params_m, gflops_fwd, gflops_attn_fwd, unsupported_ops."""
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings; unsupported ops are returned
            fa = FlopCountAnalysis(model, inputs).set_op_handle(**EXTRA_HANDLES)
            fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            fa.tracer_warnings("none")
            total = fa.total()
            by_op = fa.by_operator()
            unsupported = {op: n for op, n in fa.unsupported_ops().items() if op not in NO_MAC_OPS}
    finally:
        model.train(was_training)
    params = count_params(model)
    return {
        "params": params,
        "params_m": params / 1e6,
        "gflops_fwd": total / 1e9,
        "gflops_attn_fwd": by_op.get("attention", 0) / 1e9,
        "unsupported_ops": dict(unsupported),
    }


def flops_of(model: nn.Module, batch_size: int = 1) -> dict:
    """FLOPs of a registered variant at its default input, per sample."""
    gen = torch.Generator().manual_seed(0)
    device = next(iter(model.parameters())).device
    inputs = model.example_inputs(batch_size, device=device, generator=gen)
    out = count_flops(model, inputs)
    if batch_size != 1:
        out["gflops_fwd"] /= batch_size
        out["gflops_attn_fwd"] /= batch_size
    return out


def build_uninitialised(name: str, overrides: dict | None = None) -> tuple[nn.Module, Any]:
    """Build a variant without running its (slow) weight initialisation: for counting only."""
    from harness import registry

    with torch.device("meta"):
        model, cfg = registry.build(name, overrides)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # zeros, not garbage: denormal garbage makes CPU matmuls crawl
        for t in [*model.parameters(), *model.buffers()]:
            t.zero_()
    return model, cfg
