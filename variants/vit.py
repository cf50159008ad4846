"""A plain ViT image classifier (Dosovitskiy et al.): the first study's model and the
shape every other classifier here is compared against.

Patchify (strided conv) -> [CLS] + learned position embedding -> pre-norm blocks ->
LayerNorm -> head on the CLS token (or the mean of the patch tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from harness.errors import ConfigError
from harness.registry import Variant, register

from .common import Block


@dataclass
class ViTConfig:
    input_size: int = 224          # image side
    in_channels: int = 3
    patch_size: int = 16
    hidden_size: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    pool: Literal["cls", "mean"] = "cls"

    def validate(self) -> None:
        if self.input_size % self.patch_size:
            raise ConfigError(f"patch_size={self.patch_size} does not divide input_size="
                              f"{self.input_size}; valid: "
                              f"{[p for p in range(1, self.input_size + 1) if self.input_size % p == 0]}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size={self.hidden_size} is not divisible by num_heads="
                              f"{self.num_heads}")
        for k in ("depth", "num_heads", "num_classes", "in_channels"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")


class ViT(Variant):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.num_patches = (cfg.input_size // cfg.patch_size) ** 2
        self.patch_embed = nn.Conv2d(cfg.in_channels, d, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, d))
        self.blocks = nn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.num_classes)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """timm's ViT init: trunc-normal(0.02) embeddings and linears, zero biases, zero head."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, T, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (N, T+1, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        pooled = x[:, 0] if self.cfg.pool == "cls" else x[:, 1:].mean(1)  # (N, D)
        return self.head(pooled)  # (N, classes)

    def example_inputs(self, batch_size, device="cpu", generator=None):
        c = self.cfg
        return (torch.randn(batch_size, c.in_channels, c.input_size, c.input_size,
                            generator=generator).to(device),)

    def tokens_per_sample(self) -> int:
        return self.num_patches + 1


# (depth, width, heads): timm's ViT-Ti/S/B
for _name, (_depth, _width, _heads) in {"vit-ti": (12, 192, 3), "vit-s": (12, 384, 6),
                                        "vit-b": (12, 768, 12)}.items():
    register(_name, family="vit", config=ViTConfig, depth=_depth, hidden_size=_width,
             num_heads=_heads, test_overrides={"depth": 2, "input_size": 32, "num_classes": 10},
             doc=f"ViT-{_name[4:].upper()}: {_depth} layers, width {_width}, {_heads} heads, patch 16")(
        lambda cfg: ViT(cfg))

register("vit-digits", family="vit", config=ViTConfig, input_size=8, in_channels=1, patch_size=2,
         hidden_size=64, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=10,
         doc="A small ViT for the 8x8 digits: 4 layers, width 64, 4 heads, patch 2")(lambda cfg: ViT(cfg))
