"""ViViT (Arnab et al., ICCV 2021): a video transformer with all four model variants.

    model = 1  spatio-temporal attention   every token attends to every token (ViT on a video)
            2  factorised encoder          spatial encoder per frame -> one vector per frame
                                           -> temporal encoder over the frame vectors
            3  factorised self-attention   each block: spatial MSA, then temporal MSA, then MLP
            4  factorised dot-product      inside each MSA half the heads attend in space, half
                                           in time; Model 1's parameters exactly (Model 1 with
                                           pooling="mean"; its CLS token adds 2 x hidden_size)

    embedding = "tubelet"  Conv3d, kernel = stride = (t, h, w): nt = T / t temporal indices
                "frames"   the paper's uniform frame sampling: each sampled frame is patchified
                           on its own with 2-D (h, w) patches, as in ViT.  The T input frames
                           are taken to be the uniformly sampled frames of the video (the data
                           pipeline samples them, as ``video_folder`` does), so by default every
                           one is embedded: nt = T.  ``frame_stride = k`` keeps frames
                           0, k, 2k, ... (nt = T / k; k = t matches the tubelet's token count).
                           Implemented as a Conv3d with kernel (1, h, w), stride (k, h, w).

Input video layout (N, C, T, H, W); ``forward(x) -> logits (N, num_classes)``.  Tokens are
ordered time-major: token ``i`` has temporal index ``i // ns`` and spatial index ``i % ns``
(ns = nh * nw).  Registered as ``vivit-{ti,s,b,l}``; the model number is a config field, so
one class serves every arm (``vivit-b --set model=3``).

Where the paper is silent we follow Scenic (``scenic/projects/vivit``): learned positional
embeddings N(0, 0.02), zero CLS tokens, a final LayerNorm per encoder, tanh-GELU MLPs,
xavier-uniform linears, a zero-initialised classifier; Models 3 and 4 have no CLS token and
average-pool; Model 3 gives space and time their own LayerNorm and attention weights.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from harness.errors import ConfigError
from harness.registry import Variant, register

from .common import Attention, Block, Mlp, attention, linear, tanh_gelu

MODEL_NAMES = {1: "spatio_temporal", 2: "factorised_encoder", 3: "factorised_self_attention",
               4: "factorised_dot_product"}


@dataclass
class ViViTConfig:
    num_frames: int = 32            # T, frames per clip (the paper's default 32)
    input_size: int = 224           # H = W of each frame
    in_channels: int = 3
    num_classes: int = 400          # Kinetics-400
    hidden_size: int = 768          # width d
    depth: int = 12                 # transformer layers (Model 2: the spatial encoder, L_s)
    num_heads: int = 12
    mlp_ratio: float = 4.0
    model: Literal[1, 2, 3, 4] = 1  # the paper's Models 1-4 (see the module docstring)
    embedding: Literal["tubelet", "frames"] = "tubelet"
    tubelet_size: tuple[int, int, int] = (2, 16, 16)  # (t, h, w); "frames" uses only (h, w)
    frame_stride: int = 1           # "frames": embed frames 0, k, 2k, ... (1: every frame)
    temporal_layers: int = 4        # Model 2: layers of the temporal encoder, L_t
    pooling: Literal["auto", "cls", "mean"] = "auto"  # auto: CLS for Models 1-2, mean for 3-4
    central_frame_init: bool = False  # tubelet kernel: 2-D init in the central frame, 0 elsewhere

    def validate(self) -> None:
        for k in ("num_frames", "input_size", "in_channels", "num_classes", "hidden_size",
                  "depth", "num_heads", "frame_stride", "temporal_layers"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        t, h, w = self.tubelet_size
        if min(t, h, w) < 1:
            raise ConfigError(f"tubelet_size entries must be >= 1, got {self.tubelet_size}")
        for name, p in (("h", h), ("w", w)):
            if self.input_size % p:
                valid = [q for q in range(1, min(self.input_size, 64) + 1) if self.input_size % q == 0]
                raise ConfigError(f"tubelet_size {name}={p} does not divide input_size="
                                  f"{self.input_size}; valid patch sides: {valid}")
        if self.embedding == "tubelet":
            if self.num_frames % t:
                valid = [q for q in range(1, self.num_frames + 1) if self.num_frames % q == 0]
                raise ConfigError(f"tubelet_size t={t} does not divide num_frames="
                                  f"{self.num_frames}; valid t: {valid}")
            if self.frame_stride != 1:
                raise ConfigError("frame_stride applies to embedding='frames' only; with "
                                  "embedding='tubelet' the temporal stride is tubelet_size[0]")
        else:
            if self.num_frames % self.frame_stride:
                raise ConfigError(f"frame_stride={self.frame_stride} does not divide num_frames="
                                  f"{self.num_frames}")
            if self.central_frame_init:
                raise ConfigError("central_frame_init initialises a tubelet (3-D) kernel; it "
                                  "needs embedding='tubelet'")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads="
                              f"{self.num_heads}")
        if self.model == 4 and self.num_heads % 2:
            raise ConfigError(f"model=4 gives half the heads to space and half to time, so "
                              f"num_heads must be even, got {self.num_heads} (e.g. vivit-ti has 3: "
                              f"set num_heads=2 or 4 with a hidden_size they divide)")
        if self.model in (3, 4) and self.pooling == "cls":
            raise ConfigError(f"model={self.model} has no CLS token (attention is factorised over "
                              "time and space indices, which a CLS token lacks); use pooling="
                              "'mean' or 'auto'")

    # ------------------------------------------------------------ derived sizes
    @property
    def pool(self) -> str:
        """The pooling actually used ('cls' or 'mean')."""
        if self.pooling != "auto":
            return self.pooling
        return "cls" if self.model in (1, 2) else "mean"

    @property
    def kernel(self) -> tuple[int, int, int]:
        t, h, w = self.tubelet_size
        return (t, h, w) if self.embedding == "tubelet" else (1, h, w)

    @property
    def stride(self) -> tuple[int, int, int]:
        t, h, w = self.tubelet_size
        return (t, h, w) if self.embedding == "tubelet" else (self.frame_stride, h, w)

    @property
    def grid(self) -> tuple[int, int, int]:
        """(nt, nh, nw) token grid."""
        _, h, w = self.tubelet_size
        return self.num_frames // self.stride[0], self.input_size // h, self.input_size // w


# ------------------------------------------------------------------ core ideas

def central_frame_init(conv3d: nn.Conv3d, weight2d: torch.Tensor) -> None:
    """Tubelet kernel from 2-D patch weights: the central frame (t // 2) gets ``weight2d``
    (D, C, h, w), every other frame 0, so at start the tubelet sees only its central frame."""
    w = conv3d.weight
    if weight2d.shape != (w.shape[0], w.shape[1], w.shape[3], w.shape[4]):
        raise ValueError(f"2-D weights {tuple(weight2d.shape)} do not match the tubelet kernel "
                         f"{tuple(w.shape)} (expected (D, C, h, w))")
    with torch.no_grad():
        w.zero_()
        w[:, :, w.shape[2] // 2] = weight2d.to(w)


def frames_as_batch(x: torch.Tensor, nt: int) -> torch.Tensor:
    """(B, nt*ns, D) -> (B*nt, ns, D): one sequence per temporal index (spatial attention)."""
    B, N, D = x.shape
    return x.reshape(B * nt, N // nt, D)


def positions_as_batch(x: torch.Tensor, nt: int) -> torch.Tensor:
    """(B, nt*ns, D) -> (B*ns, nt, D): one sequence per spatial index (temporal attention)."""
    B, N, D = x.shape
    return x.reshape(B, nt, N // nt, D).transpose(1, 2).reshape(B * (N // nt), nt, D)


def positions_from_batch(x: torch.Tensor, nt: int, batch: int) -> torch.Tensor:
    """Inverse of ``positions_as_batch``: (B*ns, nt, D) -> (B, nt*ns, D)."""
    _, _, D = x.shape
    return x.reshape(batch, -1, nt, D).transpose(1, 2).reshape(batch, -1, D)


def factorised_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         num_frames: int) -> torch.Tensor:
    """Model 4: the first half of the heads attend over tokens of the same temporal index
    (space), the second half over tokens of the same spatial index (time).

    q, k, v: (B, H, nt*ns, Dh), tokens time-major -> (B, H, nt*ns, Dh), heads concatenated.
    """
    B, H, N, Dh = q.shape
    nt, ns, h = num_frames, N // num_frames, H // 2

    def space(z):  # (B, h, N, Dh) -> (B*h, nt, ns, Dh): attend within a frame
        return z.reshape(B * h, nt, ns, Dh)

    def time(z):   # (B, h, N, Dh) -> (B*h, ns, nt, Dh): attend across frames
        return z.reshape(B * h, nt, ns, Dh).transpose(1, 2)

    o_s = attention(space(q[:, :h]), space(k[:, :h]), space(v[:, :h]))  # (B*h, nt, ns, Dh)
    o_t = attention(time(q[:, h:]), time(k[:, h:]), time(v[:, h:]))     # (B*h, ns, nt, Dh)
    o_s = o_s.reshape(B, h, N, Dh)
    o_t = o_t.transpose(1, 2).reshape(B, H - h, N, Dh)
    return torch.cat([o_s, o_t], dim=1)  # (B, H, N, Dh)


# ------------------------------------------------------------------ layers

class SpaceAttention(Attention):
    """Self-attention among tokens with the same temporal index (Model 3's spatial MSA)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, *, num_frames: int):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        self.num_frames = num_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        y = super().forward(frames_as_batch(x, self.num_frames))  # (B*nt, ns, D)
        return y.reshape(B, N, D)


class TimeAttention(Attention):
    """Self-attention among tokens with the same spatial index (Model 3's temporal MSA)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, *, num_frames: int):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        self.num_frames = num_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(positions_as_batch(x, self.num_frames))  # (B*ns, nt, D)
        return positions_from_batch(y, self.num_frames, x.shape[0])  # (B, nt*ns, D)


class FactorisedDotProductAttention(Attention):
    """Model 4: Model 1's attention layer (same qkv and proj weights) whose heads are split
    between space and time by ``factorised_attention``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, *, num_frames: int):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias)
        self.num_frames = num_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)  # 3 x (B, H, N, Dh)
        return self.merge_heads(factorised_attention(q, k, v, self.num_frames))  # (B, N, D)


def _norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)


class FactorisedSelfAttentionBlock(nn.Module):
    """Model 3 block: spatial MSA, then temporal MSA, then the MLP; each pre-norm, residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, num_frames: int):
        super().__init__()
        self.norm_s = _norm(dim)
        self.attn_s = SpaceAttention(dim, num_heads, num_frames=num_frames)
        self.norm_t = _norm(dim)
        self.attn_t = TimeAttention(dim, num_heads, num_frames=num_frames)
        self.norm2 = _norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=tanh_gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_s(self.norm_s(x))  # within each frame
        x = x + self.attn_t(self.norm_t(x))  # across frames, per spatial position
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """[CLS] + tokens + learned positions -> blocks -> LayerNorm -> one pooled vector."""

    def __init__(self, num_tokens: int, dim: int, blocks: list[nn.Module], pool: str):
        super().__init__()
        self.pool = pool
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens + (pool == "cls"), dim))
        self.blocks = nn.ModuleList(blocks)
        self.norm = _norm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+L, D)
        x = x + self.pos_embed  # (B, L', D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, D)


class FactorisedEncoder(nn.Module):
    """Model 2: a spatial encoder per temporal index, then a temporal encoder over frames."""

    def __init__(self, spatial: Encoder, temporal: Encoder, num_frames: int):
        super().__init__()
        self.spatial = spatial
        self.temporal = temporal
        self.num_frames = num_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        frames = self.spatial(frames_as_batch(x, self.num_frames))  # (B*nt, D): one per frame
        return self.temporal(frames.reshape(B, self.num_frames, D))  # (B, D)


# ------------------------------------------------------------------ the model

class ViViT(Variant):
    """Video classifier: forward(x (N, C, T, H, W)) -> logits (N, num_classes)."""

    def __init__(self, cfg: ViViTConfig):
        super().__init__()
        self.cfg = cfg
        d, heads, ratio = cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio
        self.nt, nh, nw = cfg.grid
        self.ns = nh * nw
        n_tokens = self.nt * self.ns
        # tubelet: kernel = stride = (t, h, w); frames: kernel (1, h, w), stride (k, h, w)
        self.patch_embed = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.kernel, stride=cfg.stride)
        vit_block = functools.partial(Block, d, heads, ratio, act=tanh_gelu)
        pool = cfg.pool
        if cfg.model == 1:
            self.encoder = Encoder(n_tokens, d, [vit_block() for _ in range(cfg.depth)], pool)
        elif cfg.model == 2:
            self.encoder = FactorisedEncoder(
                Encoder(self.ns, d, [vit_block() for _ in range(cfg.depth)], pool),
                Encoder(self.nt, d, [vit_block() for _ in range(cfg.temporal_layers)], pool),
                self.nt)
        elif cfg.model == 3:
            self.encoder = Encoder(n_tokens, d, [
                FactorisedSelfAttentionBlock(d, heads, ratio, num_frames=self.nt)
                for _ in range(cfg.depth)], pool)
        else:
            attn = functools.partial(FactorisedDotProductAttention, num_frames=self.nt)
            self.encoder = Encoder(n_tokens, d, [vit_block(attn_layer=attn)
                                                 for _ in range(cfg.depth)], pool)
        self.head = nn.Linear(d, cfg.num_classes)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every initialisation in one place (Scenic's ViViT / ViT)."""
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(_basic)
        # patch embedding like a Linear: xavier on the flattened (D, C*t*h*w) kernel
        w = self.patch_embed.weight
        if self.cfg.central_frame_init:
            # a 2-D (D, C, h, w) patch kernel, xavier over its own fan-in, in the central frame
            w2d = torch.empty(w.shape[0], w.shape[1], w.shape[3], w.shape[4], device=w.device)
            nn.init.xavier_uniform_(w2d.view(w2d.shape[0], -1))
            central_frame_init(self.patch_embed, w2d)
        else:
            nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.modules():
            if isinstance(m, Encoder):
                nn.init.normal_(m.pos_embed, std=0.02)  # learned positions (BERT / ViT)
                if m.cls_token is not None:
                    nn.init.zeros_(m.cls_token)
        # classifier starts at zero (Scenic's output_projection): uniform logits at step 0
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, T, H, W) -> (N, nt*nh*nw, D) tokens, time-major, contiguous.

        The Conv3d's own map (its weight and bias; kernel = stride in space, and in time for
        tubelets), computed as patches times the flattened kernel: one GEMM, and tokens
        already in (N, L, D) order.  The convolution would leave them as a transposed view of
        (N, D, L), a layout that every later residual add keeps and every LayerNorm copies."""
        conv = self.patch_embed
        kt, kh, kw = conv.kernel_size
        if conv.stride[0] != kt:  # "frames": kernel 1 in time, stride k: frames 0, k, 2k, ...
            x = x[:, :, ::conv.stride[0]]
        N, C, T, H, W = x.shape
        nt, nh, nw = T // kt, H // kh, W // kw
        patches = (x.reshape(N, C, nt, kt, nh, kh, nw, kw).permute(0, 2, 4, 6, 1, 3, 5, 7)
                   .reshape(N, nt * nh * nw, C * kt * kh * kw))  # (N, L, C*t*h*w), time-major
        return linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)  # (N, L, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)  # (N, nt*ns, D)
        return self.head(self.encoder(tokens))  # (N, num_classes)

    # ---------------------------------------------------------- Variant protocol
    def example_inputs(self, batch_size, device="cpu", generator=None):
        c = self.cfg
        x = torch.randn(batch_size, c.in_channels, c.num_frames, c.input_size, c.input_size,
                        generator=generator)
        return (x.to(device),)

    def tokens_per_sample(self) -> int:
        """Patch tokens plus CLS tokens (Model 2: one per frame and one temporal)."""
        cls = self.cfg.pool == "cls"
        if self.cfg.model == 2:
            return self.nt * (self.ns + cls) + cls
        return self.nt * self.ns + cls

    def tags(self) -> dict[str, str]:
        return {"vivit_model": str(self.cfg.model),
                "vivit_attention": MODEL_NAMES[self.cfg.model],
                "embedding": self.cfg.embedding,
                "pooling": self.cfg.pool,
                "token_grid": "x".join(str(n) for n in self.cfg.grid),
                "attention_path": "attention() (SDPA; short fp32 CPU sequences: matmuls, "
                                  "see the cpu_attention tag)"}


# ------------------------------------------------------------------ the zoo
# (layers, width, heads) as in ViT / the paper; MLP 4x
VIVIT_SIZES = {"ti": (12, 192, 3), "s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16)}


def _register_vivit(size: str) -> None:
    depth, width, heads = VIVIT_SIZES[size]

    @register(f"vivit-{size}", family="vivit", config=ViViTConfig, depth=depth,
              hidden_size=width, num_heads=heads,
              test_overrides={"depth": 2, "temporal_layers": 1, "input_size": 16,
                              "num_frames": 4, "tubelet_size": (2, 8, 8), "num_classes": 10})
    def make(cfg: ViViTConfig) -> ViViT:
        return ViViT(cfg)

    make.__doc__ = (f"ViViT-{size.upper()}: {depth} layers, width {width}, {heads} heads; "
                    "Models 1-4 via model=")


for _size in VIVIT_SIZES:
    _register_vivit(_size)
