"""ViViT: the four models, both embeddings, FLOPs against an independent formula and the
paper's Table 4, and proof that Models 3 and 4 really factorise space and time."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness import registry
from harness.errors import ConfigError
from harness.metrics.flops import build_uninitialised, flops_of
from variants.common import Attention
from variants.vivit import (FactorisedDotProductAttention, SpaceAttention, TimeAttention,
                            ViViTConfig, central_frame_init, factorised_attention,
                            frames_as_batch, positions_as_batch, positions_from_batch)

MODELS = (1, 2, 3, 4)
EMBEDDINGS = ("tubelet", "frames")
# small enough to run in milliseconds, wide enough (192) that LayerNorm (which fvcore
# counts, 5 flops per element) stays well under 1% of the matmuls
SMALL = {"depth": 2, "temporal_layers": 2, "input_size": 16, "num_frames": 8,
         "tubelet_size": (2, 4, 4), "num_classes": 10, "hidden_size": 192, "num_heads": 4,
         "in_channels": 1}


def small(model: int, embedding: str = "tubelet", **extra):
    return registry.build("vivit-ti", {**SMALL, "model": model, "embedding": embedding, **extra},
                          seed=0)


# ------------------------------------------------------------------ an independent formula

def analytic_macs(cfg: ViViTConfig) -> tuple[int, int]:
    """(total, attention) forward multiply-adds at batch 1, from the config alone.

    Counted: patch embedding, q/k/v/out projections, MLP, q k^T and attn @ v, classifier.
    Not counted: norms, softmax, GELU, adds (element-wise, no multiply-adds of note)."""
    d, T, S, C = cfg.hidden_size, cfg.num_frames, cfg.input_size, cfg.in_channels
    mlp = int(d * cfg.mlp_ratio)
    t, h, w = cfg.tubelet_size
    kt, nt = (t, T // t) if cfg.embedding == "tubelet" else (1, T // cfg.frame_stride)
    ns = (S // h) * (S // w)
    N = nt * ns
    cls = int(cfg.model in (1, 2) and cfg.pooling != "mean")
    proj, ffn = 4 * d * d, 2 * d * mlp            # per token: qkv + out; fc1 + fc2

    def vit_layer(L: int, seqs: int = 1) -> tuple[int, int]:
        return seqs * L * (proj + ffn), seqs * 2 * L * L * d

    if cfg.model == 1:
        lin, att = (cfg.depth * x for x in vit_layer(N + cls))
    elif cfg.model == 2:
        ls, as_ = vit_layer(ns + cls, seqs=nt)
        lt, at = vit_layer(nt + cls)
        lin = cfg.depth * ls + cfg.temporal_layers * lt
        att = cfg.depth * as_ + cfg.temporal_layers * at
    elif cfg.model == 3:  # two attention layers (space, time) and one MLP per block
        lin = cfg.depth * N * (2 * proj + ffn)
        att = cfg.depth * (2 * N * ns * d + 2 * N * nt * d)
    else:                 # Model 1's projections; half the width attends over ns, half over nt
        lin = cfg.depth * N * (proj + ffn)
        att = cfg.depth * (N * ns * d + N * nt * d)
    embed = N * d * C * kt * h * w
    head = d * cfg.num_classes
    return embed + lin + att + head, att


@pytest.mark.parametrize("embedding", EMBEDDINGS)
@pytest.mark.parametrize("model_n", MODELS)
def test_flops_match_formula_small(model_n, embedding):
    model, cfg = small(model_n, embedding)
    f = flops_of(model)
    assert f["unsupported_ops"] == {}
    total, att = analytic_macs(cfg)
    assert f["gflops_attn_fwd"] * 1e9 == pytest.approx(att, rel=1e-9)   # attention: exact
    assert f["gflops_fwd"] * 1e9 == pytest.approx(total, rel=0.01)


# ViViT-B, 32 x 224^2, tubelet 2x16x16 (Model 2: L_s = 12, L_t = 4): the paper's Table 4
PAPER_TABLE4 = {1: (455.2, 88.9), 2: (284.4, 115.1), 3: (372.3, 117.3), 4: (277.1, 88.9)}


@pytest.fixture(scope="module")
def vivit_b_counts():
    """ViViT-B at the paper's input, counted by the harness at depth 1 and 2 (tracing all 12
    layers costs ~2.8 TFLOP of real CPU work) and extended linearly to 12 layers: every layer
    of a model is the same, so depth d costs f(1) + (d - 1) * (f(2) - f(1)).  Parameters are
    counted on the full 12-layer model (no forward pass needed)."""
    cache = {}

    def get(model_n):
        if model_n not in cache:
            full, cfg = build_uninitialised("vivit-b", {"model": model_n})
            f = [flops_of(build_uninitialised("vivit-b", {"model": model_n, "depth": k})[0])
                 for k in (1, 2)]
            assert f[0]["unsupported_ops"] == {} and f[1]["unsupported_ops"] == {}
            out = {k: f[0][k] + (cfg.depth - 1) * (f[1][k] - f[0][k])
                   for k in ("gflops_fwd", "gflops_attn_fwd")}
            out["params_m"] = sum(p.numel() for p in full.parameters()) / 1e6
            cache[model_n] = (out, cfg)
        return cache[model_n]
    return get


@pytest.mark.parametrize("model_n", MODELS)
def test_vivit_b_at_paper_input(vivit_b_counts, model_n):
    f, cfg = vivit_b_counts(model_n)
    assert (cfg.num_frames, cfg.input_size, cfg.tubelet_size, cfg.depth) == (32, 224, (2, 16, 16), 12)
    total, att = analytic_macs(cfg)
    assert f["gflops_attn_fwd"] * 1e9 == pytest.approx(att, rel=1e-6)
    assert f["gflops_fwd"] * 1e9 == pytest.approx(total, rel=0.01)
    gflops, params_m = PAPER_TABLE4[model_n]
    assert f["gflops_fwd"] == pytest.approx(gflops, rel=0.02)
    assert f["params_m"] == pytest.approx(params_m, rel=0.005)


def test_factorised_models_cost_less_than_joint_attention(vivit_b_counts):
    g = {m: vivit_b_counts(m)[0]["gflops_fwd"] for m in MODELS}
    assert g[4] < g[2] < g[3] < g[1]   # the paper's ordering of Table 4


# ------------------------------------------------------------------ parameters

def test_model4_has_model1_parameters():
    m1, _ = small(1, pooling="mean")
    m4, _ = small(4)
    assert sum(p.numel() for p in m4.parameters()) == sum(p.numel() for p in m1.parameters())
    m4.load_state_dict(m1.state_dict(), strict=True)   # the same tensors, name for name
    # with Model 1's default CLS token: exactly the token and its position embedding more
    m1_cls, cfg = small(1)
    diff = sum(p.numel() for p in m1_cls.parameters()) - sum(p.numel() for p in m4.parameters())
    assert diff == 2 * cfg.hidden_size


def test_model3_adds_one_attention_layer_per_block():
    m1, cfg = small(1, pooling="mean")
    m3, _ = small(3)
    d = cfg.hidden_size
    per_block = 4 * d * d + 4 * d + 2 * d   # qkv + proj weights and biases, one LayerNorm
    diff = sum(p.numel() for p in m3.parameters()) - sum(p.numel() for p in m1.parameters())
    assert diff == cfg.depth * per_block


# ------------------------------------------------------------------ forward / backward

@pytest.mark.parametrize("embedding", EMBEDDINGS)
@pytest.mark.parametrize("model_n", MODELS)
def test_forward_backward(model_n, embedding):
    model, cfg = small(model_n, embedding)
    gen = torch.Generator().manual_seed(0)
    (x,) = model.example_inputs(3, generator=gen)
    assert x.shape == (3, 1, 8, 16, 16)
    with torch.no_grad():   # classifier starts at zero: uniform logits
        assert torch.equal(model(x), torch.zeros(3, cfg.num_classes))
    nn.init.normal_(model.head.weight, std=0.02)
    logits = model(x)
    assert logits.shape == (3, cfg.num_classes) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.patch_embed.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("embedding", EMBEDDINGS)
@pytest.mark.parametrize("model_n", MODELS)
def test_tokens_per_sample(model_n, embedding):
    model, cfg = small(model_n, embedding)
    nt = 4 if embedding == "tubelet" else 8   # 8 frames, t = 2
    ns = 16
    expected = {1: nt * ns + 1, 2: nt * (ns + 1) + 1, 3: nt * ns, 4: nt * ns}[model_n]
    assert model.tokens_per_sample() == expected
    assert model.tags()["vivit_model"] == str(model_n)
    assert model.tags()["token_grid"] == f"{nt}x4x4"


def test_frames_embedding_samples_every_kth_frame():
    model, cfg = small(1, "frames", frame_stride=2)
    assert cfg.grid == (4, 4, 4)
    (x,) = model.example_inputs(1)
    tokens = model.embed(x)
    x_odd = x.clone()
    x_odd[:, :, 1::2] = 0   # frames 1, 3, 5, 7 are never embedded
    assert torch.equal(model.embed(x_odd), tokens)
    x_even = x.clone()
    x_even[:, :, 2] += 1    # frame 2 is the second sampled frame: its tokens only
    changed = (model.embed(x_even) - tokens).abs().sum(-1)[0] > 0   # (nt*ns,)
    assert changed.tolist() == [i // 16 == 1 for i in range(64)]


# ------------------------------------------------------------------ factorisation

NT, NS, D = 4, 6, 32


def perturbed(x: torch.Tensor, t: int, s: int) -> torch.Tensor:
    y = x.clone()
    y[:, t * NS + s] += torch.randn(D, generator=torch.Generator().manual_seed(1))
    return y


def token(out: torch.Tensor, t: int, s: int) -> torch.Tensor:
    return out[:, t * NS + s]


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-4


@pytest.fixture
def tokens():
    return torch.randn(2, NT * NS, D, generator=torch.Generator().manual_seed(0))


def test_token_regrouping_round_trips(tokens):
    by_pos = positions_as_batch(tokens, NT)   # (B*ns, nt, D)
    assert by_pos.shape == (2 * NS, NT, D)
    assert torch.equal(by_pos[1 * NS + 2, 3], tokens[1, 3 * NS + 2])   # batch 1, s=2, t=3
    assert torch.equal(positions_from_batch(by_pos, NT, 2), tokens)
    assert torch.equal(frames_as_batch(tokens, NT)[1 * NT + 3, 2], tokens[1, 3 * NS + 2])


@pytest.mark.parametrize("layer_cls", [SpaceAttention, TimeAttention,
                                       FactorisedDotProductAttention])
def test_factorised_layers_ignore_other_time_and_space(tokens, layer_cls):
    torch.manual_seed(0)
    layer = layer_cls(D, 4, num_frames=NT).eval()
    with torch.no_grad():
        base = layer(tokens)
        far = layer(perturbed(tokens, t=3, s=5))          # other time AND other position
        same_t = layer(perturbed(tokens, t=0, s=5))       # same frame, other position
        same_s = layer(perturbed(tokens, t=3, s=1))       # same position, other frame
    assert not changed(token(far, 0, 1), token(base, 0, 1))
    spatial = layer_cls is not TimeAttention
    temporal = layer_cls is not SpaceAttention
    assert changed(token(same_t, 0, 1), token(base, 0, 1)) == spatial
    assert changed(token(same_s, 0, 1), token(base, 0, 1)) == temporal


def test_joint_attention_does_mix_them(tokens):
    """Model 1's layer, same probe: the far token does reach (t=0, s=1), so the test above
    can fail."""
    torch.manual_seed(0)
    layer = Attention(D, 4).eval()
    with torch.no_grad():
        assert changed(token(layer(perturbed(tokens, 3, 5)), 0, 1), token(layer(tokens), 0, 1))


def test_factorised_attention_splits_heads():
    """First half of the heads: space only; second half: time only."""
    g = torch.Generator().manual_seed(0)
    B, H, Dh = 2, 4, 8
    q, k, v = (torch.randn(B, H, NT * NS, Dh, generator=g) for _ in range(3))
    base = factorised_attention(q, k, v, NT)
    i = 0 * NS + 1                      # query token (t=0, s=1)

    def with_kv_at(t, s):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t * NS + s] += 1.0
        v2[:, :, t * NS + s] += 1.0
        return factorised_attention(q, k2, v2, NT)

    same_frame, same_pos, far = with_kv_at(0, 4), with_kv_at(2, 1), with_kv_at(2, 4)
    spatial, temporal = slice(0, H // 2), slice(H // 2, H)
    assert changed(same_frame[:, spatial, i], base[:, spatial, i])
    assert not changed(same_frame[:, temporal, i], base[:, temporal, i])
    assert changed(same_pos[:, temporal, i], base[:, temporal, i])
    assert not changed(same_pos[:, spatial, i], base[:, spatial, i])
    assert not changed(far[:, :, i], base[:, :, i])


# ------------------------------------------------------------------ tubelet initialisation

@pytest.mark.parametrize("t", [2, 3])
def test_central_frame_init(t):
    conv = nn.Conv3d(2, 5, kernel_size=(t, 4, 4), stride=(t, 4, 4))
    w2d = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    central_frame_init(conv, w2d)
    assert torch.equal(conv.weight[:, :, t // 2], w2d)
    assert conv.weight.detach().abs().sum().item() == pytest.approx(w2d.abs().sum().item())
    # a tubelet now sees only its central frame: conv3d == conv2d on frames t//2, t + t//2, ...
    x = torch.randn(1, 2, 2 * t, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out3d = conv(x)                                          # (1, 5, 2, 2, 2)
        for j in range(2):
            out2d = F.conv2d(x[:, :, j * t + t // 2], w2d, conv.bias, stride=4)
            assert torch.allclose(out3d[:, :, j], out2d, atol=1e-5)
    with pytest.raises(ValueError, match="do not match"):
        central_frame_init(conv, torch.randn(5, 2, 3, 3))


def test_central_frame_init_option():
    model, _ = small(1, central_frame_init=True)
    w = model.patch_embed.weight                                 # (D, C, 2, 4, 4)
    assert w[:, :, 0].abs().sum() == 0 and w[:, :, 1].abs().sum() > 0


# ------------------------------------------------------------------ registry and validation

def test_registered_sizes():
    names = [s.name for s in registry.list_variants("vivit-*")]
    assert names == ["vivit-b", "vivit-l", "vivit-s", "vivit-ti"]
    cfg = registry.get("vivit-l").config()
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio) == (24, 1024, 16, 4.0)
    assert all(s.family == "vivit" for s in registry.list_variants("vivit-*"))


def test_model_number_from_the_command_line():
    cfg = registry.get("vivit-b").config(model="3", embedding="frames", tubelet_size="[1, 16, 16]")
    assert cfg.model == 3 and cfg.tubelet_size == (1, 16, 16)


@pytest.mark.parametrize("name", ["vivit-ti", "vivit-s", "vivit-b", "vivit-l"])
def test_test_overrides_build_small_models(name):
    spec = registry.get(name)
    model, cfg = registry.build(name, spec.test_overrides, seed=0)
    (x,) = model.example_inputs(2)
    assert x.shape == (2, 3, 4, 16, 16) and model(x).shape == (2, 10)


@pytest.mark.parametrize("overrides, message", [
    ({"tubelet_size": (2, 16, 16), "input_size": 100}, "does not divide input_size"),
    ({"tubelet_size": (3, 16, 16)}, "valid t"),
    ({"num_heads": 5}, "not divisible by num_heads"),
    ({"model": 4}, "num_heads must be even"),                 # vivit-ti has 3 heads
    ({"model": 3, "pooling": "cls"}, "no CLS token"),
    ({"embedding": "frames", "central_frame_init": True}, "needs embedding='tubelet'"),
    ({"frame_stride": 2}, "embedding='frames' only"),
    ({"embedding": "frames", "frame_stride": 3}, "does not divide num_frames"),
    ({"depth": 0}, "depth must be >= 1"),
])
def test_impossible_configs_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        registry.get("vivit-ti").config(**overrides)
