"""FLOPs agree with an analytic formula written independently of the model code."""
import pytest

from harness import registry
from harness.metrics.flops import build_uninitialised, flops_of

ARMS = ["in_context", "cross_attention", "adaln", "adaln_zero"]


def dit_macs(depth, d, p, image=32, c=4, learn_sigma=True, arm="adaln_zero", freq=256):
    """Forward multiply-adds of DiT at batch 1 (matmuls + attention; element-wise ops free)."""
    t = (image // p) ** 2                      # image tokens
    tt = t + 2 if arm == "in_context" else t   # tokens inside the blocks
    c_out = 2 * c if learn_sigma else c
    macs = t * d * c * p * p                   # patch embedding
    macs += freq * d + d * d                   # timestep MLP (labels: a lookup)
    per_block = 3 * tt * d * d + tt * d * d    # qkv + output projection
    per_block += 2 * tt * tt * d               # q k^T and attn @ v
    per_block += 8 * tt * d * d                # MLP, ratio 4
    if arm == "cross_attention":
        per_block += t * d * d + 2 * 2 * d * d + t * d * d  # q, kv of the 2 tokens, proj
        per_block += 2 * t * 2 * d             # attention to 2 tokens
    if arm == "adaln_zero":
        per_block += 6 * d * d
    if arm == "adaln":
        per_block += 4 * d * d
    macs += depth * per_block
    macs += t * d * p * p * c_out              # final linear
    if arm in ("adaln", "adaln_zero"):
        macs += 2 * d * d                      # final adaLN
    return macs


CASES = [(spec.name, arm) for spec in registry.list_variants("dit-*") for arm in ARMS]


@pytest.mark.parametrize("name,arm", CASES, ids=[f"{n}-{a}" for n, a in CASES])
def test_dit_flops_match_the_formula(name, arm):
    # every registered size/patch and arm; at 16x16 latents to keep CI fast (the formula is
    # exact in the image size, and the paper's 32x32 input is checked below)
    model, cfg = build_uninitialised(name, {"conditioning": arm, "input_size": 16})
    got = flops_of(model)
    want = dit_macs(cfg.depth, cfg.hidden_size, cfg.patch_size, image=16, arm=arm)
    assert got["gflops_fwd"] * 1e9 == pytest.approx(want, rel=0.01)
    assert got["unsupported_ops"] == {}


@pytest.mark.parametrize("name,paper", [("dit-s/2", 6.06), ("dit-b/2", 23.01), ("dit-l/2", 80.71),
                                        ("dit-xl/4", 29.05), ("dit-xl/8", 7.39)])
def test_dit_flops_match_the_paper(name, paper):
    """DiT Table 4 (Gflops of adaLN-Zero models, 256x256 images = 32x32x4 latents)."""
    model, cfg = build_uninitialised(name)
    got = flops_of(model)["gflops_fwd"]
    assert got == pytest.approx(paper, rel=0.01)
    assert got * 1e9 == pytest.approx(dit_macs(cfg.depth, cfg.hidden_size, cfg.patch_size), rel=0.01)


@pytest.mark.parametrize("arm,paper", [("in_context", 119.4), ("cross_attention", 137.6),
                                       ("adaln", 118.6), ("adaln_zero", 118.6)])
def test_dit_xl2_arms_match_the_paper(arm, paper):
    """DiT section 3.2 / Figure 5: XL/2 Gflops per conditioning block."""
    model, _ = build_uninitialised("dit-xl/2", {"conditioning": arm})
    assert flops_of(model)["gflops_fwd"] == pytest.approx(paper, rel=0.01)


def test_attention_is_counted():
    model, cfg = build_uninitialised("dit-s/2")
    f = flops_of(model)
    t, d = 256, 384
    assert f["gflops_attn_fwd"] * 1e9 == pytest.approx(12 * 2 * t * t * d, rel=1e-6)
