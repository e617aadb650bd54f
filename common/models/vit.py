"""A small 3D Vision Transformer image encoder, written for Opacus and federation.

MONAI's ViT was not used: its learnable position embedding and class token are
bare parameters of a container module, for which Opacus' ``hooks`` mode has no
per-sample gradient, and its size is fixed by ``img_size`` at construction.
Here the patch embedding is a Conv3d, attention and MLP are Linear layers,
normalisation is LayerNorm (all supported by Opacus), and the position code is
a fixed 3D sinusoid computed from the patch grid, so the encoder accepts any
input size divisible by the patch size and holds no buffers.

Register tokens (Darcet et al., "Vision Transformers Need Registers", the
configuration seed 000's DINOv2 encoder did best with): ``registers`` extra
learned tokens, without position, join the patch tokens in every block and are
dropped before pooling, so attention has somewhere other than patch tokens to
keep global scratch state. They are rows of an ``nn.Embedding`` (Opacus
computes its per-sample gradients), looked up for every sample of the batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_position_code(grid: tuple[int, int, int], dim: int, device=None,
                             dtype=torch.float32) -> torch.Tensor:
    """Fixed 3D sine/cosine position code, (D * H * W, dim) in row-major patch order.

    Each axis gets ``2 * (dim // 6)`` channels (sines and cosines of the patch
    index at geometric frequencies); any remaining channels are zero.
    """
    per_axis = dim // 6
    code = torch.zeros(*grid, dim, device=device, dtype=dtype)
    if per_axis == 0:
        return code.reshape(-1, dim)
    freqs = torch.exp(-math.log(1e4) * torch.arange(per_axis, device=device, dtype=dtype) / per_axis)
    axes = torch.meshgrid(*[torch.arange(n, device=device, dtype=dtype) for n in grid], indexing="ij")
    parts = []
    for position in axes:
        angle = position[..., None] * freqs
        parts += [torch.sin(angle), torch.cos(angle)]
    filled = torch.cat(parts, dim=-1)
    code = torch.cat([filled, code[..., filled.shape[-1]:]], dim=-1)
    return code.reshape(-1, dim)


class SelfAttention(nn.Module):
    """Multi-head self-attention from Linear layers (batch, tokens, width) -> same shape."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(width // self.heads), dim=-1)
        mixed = (self.dropout(attention) @ v).transpose(1, 2).reshape(batch, tokens, width)
        return self.out(mixed)


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViTEncoder3d(nn.Module):
    """3D ViT encoder: (batch, in_channels, D, H, W) -> (batch, 2 * width).

    Non-overlapping ``patch_size``^3 patches (D, H, W must be multiples of it)
    are embedded by a Conv3d, given the fixed position code, and passed through
    ``depth`` pre-norm blocks of ``heads`` heads, beside ``registers`` register
    tokens. The embedding is the mean patch token concatenated with the mean
    patch token weighted by the tumour mask (the last input channel, averaged
    per patch); the registers are not pooled.
    """

    def __init__(self, in_channels: int, width: int = 96, patch_size: int = 8, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0, dropout: float = 0.0, registers: int = 0):
        super().__init__()
        if in_channels < 2:
            raise ValueError(f"in_channels must be >= 2 (phases + mask), got {in_channels}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if heads < 1 or width < 1 or width % heads:
            raise ValueError(f"width must be a positive multiple of heads, got width {width}, heads {heads}")
        if mlp_ratio <= 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"mlp_ratio must be > 0 and dropout in [0, 1), got {mlp_ratio}, {dropout}")
        if registers < 0:
            raise ValueError(f"registers must be >= 0, got {registers}")
        self.patch_size = patch_size
        self.width = width
        self.patch_embed = nn.Conv3d(in_channels, width, kernel_size=patch_size, stride=patch_size)
        self.blocks = nn.Sequential(*[TransformerBlock(width, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.registers = nn.Embedding(registers, width) if registers else None
        self.out_features = 2 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(s % self.patch_size for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} is not a multiple of patch_size {self.patch_size}")
        patches = self.patch_embed(x)
        grid = tuple(patches.shape[2:])
        tokens = patches.flatten(2).transpose(1, 2)
        tokens = tokens + sinusoidal_position_code(grid, self.width, tokens.device, tokens.dtype)
        n_patches = tokens.shape[1]
        if self.registers is not None:
            index = torch.arange(self.registers.num_embeddings, device=tokens.device).expand(len(tokens), -1)
            tokens = torch.cat([tokens, self.registers(index).to(tokens.dtype)], dim=1)
        tokens = self.norm(self.blocks(tokens))[:, :n_patches]
        mask = nn.functional.avg_pool3d(x[:, -1:], self.patch_size).flatten(1)[..., None]
        inside = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-3)
        return torch.cat([tokens.mean(dim=1), inside], dim=1)
