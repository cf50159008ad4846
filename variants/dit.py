"""DiT (Peebles & Xie, ICCV 2023) with all four conditioning blocks of the paper's ablation.

    conditioning = "in_context"       t and y appended as two tokens; plain ViT blocks
                   "cross_attention"  plain block + cross-attention to [t_emb, y_emb]
                   "adaln"            LayerNorm without affine, shift/scale regressed from c
                   "adaln_zero"       adaLN + zero-initialised gates: each block starts as identity

Registered as ``dit-{s,b,l,xl}/{2,4,8}``; the conditioning type is a config field, so one
model class serves every arm.  Follows facebookresearch/DiT ``models.py`` for every detail
the paper leaves open (eps=1e-6 LayerNorms, tanh-GELU, xavier init, N(0, .02) embeddings).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from harness.errors import ConfigError
from harness.registry import Variant, register

from .common import Attention, CrossAttention, Mlp, sincos_2d, tanh_gelu, timestep_embedding

Conditioning = Literal["in_context", "cross_attention", "adaln", "adaln_zero"]


@dataclass
class DiTConfig:
    input_size: int = 32            # side of the (latent) image: 256px / VAE factor 8
    in_channels: int = 4            # SD-VAE latents have 4 channels
    patch_size: int = 2             # p in {2, 4, 8}: T = (input_size / p)^2 tokens
    hidden_size: int = 1152         # width d
    depth: int = 28                 # number of DiT blocks
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000         # + 1 "null" class for classifier-free guidance
    class_dropout_prob: float = 0.1  # label -> null class with this probability in training
    learn_sigma: bool = True        # output 2C channels (epsilon and variance interpolation)
    conditioning: Conditioning = "adaln_zero"
    frequency_embedding_size: int = 256  # sinusoidal timestep features before the MLP

    def validate(self) -> None:
        if self.input_size % self.patch_size:
            raise ConfigError(f"patch_size={self.patch_size} does not divide input_size="
                              f"{self.input_size}; valid patch sizes: "
                              f"{[p for p in (1, 2, 4, 8, 16) if self.input_size % p == 0]}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads="
                              f"{self.num_heads}")
        if (self.hidden_size // 2) % 2:
            raise ConfigError(f"hidden_size={self.hidden_size} must be divisible by 4 for the "
                              "2-D sin-cos position embedding")
        for k in ("input_size", "in_channels", "patch_size", "depth", "num_heads", "num_classes"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ConfigError(f"class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, per sample, broadcast over tokens (one fused pass)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def gated(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """adaLN-Zero's gated residual x + gate * y, gate per sample.  Not an ``addcmul``: its
    backward (the gate's gradient reduced over tokens) measured 1.3x slower in fp32 and 3.8x
    under bf16 autocast (mixed dtypes) on DiT-S/2 shapes."""
    return x + gate.unsqueeze(1) * y


class TimestepEmbedder(nn.Module):
    """t -> 256-d sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_embedding_size)  # (N, 256)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (N, D)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra 'null' class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes  # index of the null class
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None):
        """Replace labels by the null class (randomly in training, or where forced)."""
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None):
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


def _norm(d: int, affine: bool) -> nn.LayerNorm:
    return nn.LayerNorm(d, elementwise_affine=affine, eps=1e-6)


class DiTBlock(nn.Module):
    """One block for any of the four conditioning types (the arm is a constructor argument)."""

    def __init__(self, d: int, num_heads: int, mlp_ratio: float, conditioning: Conditioning):
        super().__init__()
        self.conditioning = conditioning
        adaptive = conditioning in ("adaln", "adaln_zero")
        self.norm1 = _norm(d, affine=not adaptive)
        self.attn = Attention(d, num_heads, qkv_bias=True)
        if conditioning == "cross_attention":
            self.norm_cross = _norm(d, affine=True)
            self.cross_attn = CrossAttention(d, num_heads, qkv_bias=True)
        self.norm2 = _norm(d, affine=not adaptive)
        self.mlp = Mlp(d, int(d * mlp_ratio), act=tanh_gelu)
        if adaptive:  # shift, scale (, gate) for attention and for MLP
            n = 6 if conditioning == "adaln_zero" else 4
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, n * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None):
        # x: (N, T, D) tokens; c: (N, D) = t_emb + y_emb; context: (N, 2, D) = [t_emb, y_emb]
        if self.conditioning == "adaln_zero":
            sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=1)
            x = gated(x, g_a, self.attn(modulate(self.norm1(x), sh_a, sc_a)))
            return gated(x, g_m, self.mlp(modulate(self.norm2(x), sh_m, sc_m)))
        if self.conditioning == "adaln":
            sh_a, sc_a, sh_m, sc_m = self.adaLN_modulation(c).chunk(4, dim=1)
            x = x + self.attn(modulate(self.norm1(x), sh_a, sc_a))
            return x + self.mlp(modulate(self.norm2(x), sh_m, sc_m))
        x = x + self.attn(self.norm1(x))
        if self.conditioning == "cross_attention":
            x = x + self.cross_attn(self.norm_cross(x), context)  # queries: tokens, keys: 2 cond tokens
        return x + self.mlp(self.norm2(x))


class FinalLayer(nn.Module):
    """Norm (+ adaLN shift/scale for the adaLN arms) -> Linear(d, p*p*C_out)."""

    def __init__(self, d: int, patch_size: int, out_channels: int, adaptive: bool):
        super().__init__()
        self.adaptive = adaptive
        self.norm_final = _norm(d, affine=not adaptive)
        self.linear = nn.Linear(d, patch_size * patch_size * out_channels)
        if adaptive:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.adaptive:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.linear(modulate(self.norm_final(x), shift, scale))
        return self.linear(self.norm_final(x))  # (N, T, p*p*C_out)


class DiT(Variant):
    """Diffusion transformer: forward(x, t, y) -> epsilon (and variance) prediction."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.grid = cfg.input_size // p
        self.num_patches = self.grid ** 2
        self.x_embedder = nn.Conv2d(cfg.in_channels, d, kernel_size=p, stride=p, bias=True)
        self.t_embedder = TimestepEmbedder(d, cfg.frequency_embedding_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        # fixed (frozen) 2-D sin-cos position embedding of the image tokens
        self.register_buffer("pos_embed", torch.zeros(1, self.num_patches, d), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.conditioning)
                                    for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, p, cfg.out_channels,
                                      adaptive=cfg.conditioning in ("adaln", "adaln_zero"))
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Every initialisation in one place (DiT models.py)."""
        def _basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(_basic)
        pe = sincos_2d(self.cfg.hidden_size, self.grid)
        self.pos_embed.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        # patch embedding like a Linear (xavier on the flattened kernel)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        # condition embeddings: N(0, 0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.cfg.conditioning == "adaln_zero":
            # the "Zero": every block's gates (and shifts/scales) start at 0 -> identity
            for block in self.blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.final_layer.linear.weight)
            nn.init.zeros_(self.final_layer.linear.bias)

    # -------------------------------------------------------------------- forward
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p, h = self.cfg.out_channels, self.cfg.patch_size, self.grid
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def embed(self, x, t, y, force_drop_ids=None):
        # contiguous: the conv's (N, D, T) layout would otherwise follow the residual stream
        # through every block, and each LayerNorm would copy it (forward and backward)
        x = self.x_embedder(x).flatten(2).transpose(1, 2).contiguous() + self.pos_embed  # (N, T, D)
        t_emb = self.t_embedder(t)  # (N, D)
        y_emb = self.y_embedder(y, force_drop_ids)  # (N, D)
        return x, t_emb, y_emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, C, H, W) noisy input, t: (N,) timesteps, y: (N,) labels."""
        x, t_emb, y_emb = self.embed(x, t, y, force_drop_ids)
        c = t_emb + y_emb  # (N, D)
        context = None
        if self.cfg.conditioning == "in_context":
            x = torch.cat([x, t_emb.unsqueeze(1), y_emb.unsqueeze(1)], dim=1)  # (N, T+2, D)
        elif self.cfg.conditioning == "cross_attention":
            context = torch.stack([t_emb, y_emb], dim=1)  # (N, 2, D), kept apart
        for block in self.blocks:
            x = block(x, c, context)
        if self.cfg.conditioning == "in_context":
            x = x[:, : self.num_patches]  # drop the two conditioning tokens
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        return self.unpatchify(x)  # (N, C_out, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale: float) -> torch.Tensor:
        """Classifier-free guidance: eps_u + s * (eps_c - eps_u), one batched forward."""
        n = x.shape[0]
        drop = torch.cat([torch.zeros(n, dtype=torch.long, device=x.device),
                          torch.ones(n, dtype=torch.long, device=x.device)])
        out = self(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), force_drop_ids=drop)
        c = self.cfg.in_channels
        eps, rest = out[:, :c], out[:, c:]
        cond_eps, uncond_eps = eps[:n], eps[n:]
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([guided, rest[:n]], dim=1)

    # ---------------------------------------------------------- Variant protocol
    def example_inputs(self, batch_size, device="cpu", generator=None):
        c = self.cfg
        x = torch.randn(batch_size, c.in_channels, c.input_size, c.input_size,
                        generator=generator).to(device)
        t = torch.randint(0, 1000, (batch_size,), generator=generator).to(device)
        y = torch.randint(0, c.num_classes, (batch_size,), generator=generator).to(device)
        return x, t, y

    def tokens_per_sample(self) -> int:
        return self.num_patches + (2 if self.cfg.conditioning == "in_context" else 0)


# ------------------------------------------------------------------ the zoo
# (layers, width, heads) from the paper's Table 1
DIT_SIZES = {"s": (12, 384, 6), "b": (12, 768, 12), "l": (24, 1024, 16), "xl": (28, 1152, 16)}


def _register_dit(size: str, patch: int) -> None:
    depth, width, heads = DIT_SIZES[size]

    @register(f"dit-{size}/{patch}", family="dit", config=DiTConfig, depth=depth,
              hidden_size=width, num_heads=heads, patch_size=patch,
              test_overrides={"depth": 2, "input_size": 16, "num_classes": 10})
    def make(cfg: DiTConfig) -> DiT:
        return DiT(cfg)

    make.__doc__ = f"DiT-{size.upper()}/{patch}: {depth} layers, width {width}, {heads} heads, patch {patch}"


for _size in DIT_SIZES:
    for _patch in (2, 4, 8):
        _register_dit(_size, _patch)
