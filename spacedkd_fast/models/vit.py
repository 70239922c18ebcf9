"""DeiT-style Vision Transformers (Touvron et al. 2021), optionally with DeiT's distillation token.

    image (B, C, H, W) ──► Conv2d(C, dim, k = s = patch) ──► (B, N, dim) patch tokens, N = (image_size / patch)²
        ──► prepend [class token (, distillation token)] ──► + position embeddings ──► depth × pre-norm block
        ──► LayerNorm ──► head(class token) (, head_dist(distillation token))

    pre-norm block:  x = x + DropPath(MHSA(LN(x)));  x = x + DropPath(MLP(LN(x))),  MLP = Linear → GELU → Linear

Registered sizes (:data:`VIT_LAYOUTS`): ``deit_tiny`` is DeiT-Ti (224 px, patch 16, dim 192, depth 12, 3 heads,
5.72M parameters at 1000 classes); ``vit_tiny_32`` has the same width and depth with patch 4 for 32 px inputs
(64 patches); ``vit_micro_32`` (patch 4, dim 64, depth 4, 2 heads) is small enough to train on a CPU. Each has a
``*_distilled`` twin with the distillation token and a second head.

Output contracts (see :mod:`spacedkd_fast.models`):

* plain: ``forward(x) -> (B, num_classes)``, ``forward_features(x) -> (logits, features (B, dim))`` with
  ``model.fc(features) == logits`` (``fc`` is an alias of ``head``).
* distilled: in training mode ``forward(x) -> (2, B, num_classes)``, ``[head(class token), head_dist(dist
  token)]``; in eval mode the mean of the two, ``(B, num_classes)`` (DeiT's inference rule).
  ``forward_features`` returns the same logits and the class-token features, so ``model.fc(features)`` is the
  class head's logits (``logits[0]`` in training mode).

There is no dropout (replay must be exact); the only randomness is stochastic depth (:class:`DropPath`), drawn
from the global torch RNG on the input's device, and off in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["VIT_LAYOUTS", "DropPath", "EncoderBlock", "ViTLayout", "VisionTransformer", "init_vit_weights", "vit"]


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): zero a whole residual branch for a random subset of the samples.

    In training mode each sample ``b`` of ``x`` (``(B, ...)``, any float dtype) is kept with probability
    ``1 - p`` and scaled by ``1 / (1 - p)`` (so the expectation is ``x``), or zeroed; the identity in eval mode or
    when ``p == 0``. The mask comes from ``torch.rand`` on ``x``'s device, i.e. from the global RNG, which the
    engine saves and restores per role.

    Args:
        p: drop probability, in ``[0, 1)``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"DropPath: p must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        # One draw per sample, broadcast over the remaining dims. The scale is formed in float32 and cast once:
        # 1/keep rounded to bf16 directly would bias the expectation by up to 2^-9.
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        scale = (torch.rand(shape, device=x.device) < keep).float().div_(keep)
        return x * scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``(B, T, dim) -> (B, T, dim)``, same dtype (bfloat16 under autocast).

    ``x + DropPath(MHSA(LN(x)))`` then ``x + DropPath(MLP(LN(x)))``; the attention is
    :class:`torch.nn.MultiheadAttention` (fused q/k/v projection, scaled-dot-product kernel), the MLP
    ``Linear(dim, mlp_ratio·dim) → GELU → Linear(mlp_ratio·dim, dim)``. No dropout anywhere.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # eps 1e-6 as in DeiT
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=0.0, bias=True, batch_first=True)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        # need_weights=False lets MultiheadAttention use the fused scaled-dot-product-attention kernel.
        x = x + self.drop_path1(self.attn(h, h, h, need_weights=False)[0])
        return x + self.drop_path2(self.mlp(self.norm2(x)))


def init_vit_weights(module: nn.Module) -> None:
    """DeiT's initialization of the transformer part, in place: truncated normal (std 0.02) for every Linear weight
    (the attention's fused q/k/v projection included), zero biases, LayerNorm weight 1 / bias 0.

    The truncation bounds are DeiT's (±2 in absolute value, i.e. ±100 std): in effect a plain normal. Convs are
    left alone (DeiT keeps PyTorch's default init for the patch embedding). Draws from the global torch RNG in
    module order.
    """
    for m in module.modules():
        if isinstance(m, nn.Linear):  # includes MultiheadAttention.out_proj
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.MultiheadAttention):
            nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
            nn.init.zeros_(m.in_proj_bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """A DeiT-style ViT classifier, with or without DeiT's distillation token.

    Args:
        image_size: side of the square input images; a multiple of ``patch_size``. The position embeddings have
            one entry per patch of an ``image_size`` image (plus the class/distillation tokens), so the model only
            takes images of exactly this size.
        patch_size: side of the square patches (the patch embedding's kernel and stride).
        dim: token width.
        depth: number of encoder blocks.
        num_heads: attention heads; must divide ``dim``.
        mlp_ratio: MLP hidden width over ``dim``.
        drop_path: stochastic-depth rate of the last block; block ``i`` gets ``drop_path · i / (depth − 1)``
            (DeiT's linear rule), so the first block is never dropped.
        distilled: add the distillation token and ``head_dist``.
        num_classes: size of the logits.
        in_channels: channels of the input images.

    Attributes:
        feature_dim: ``dim``, the size of the features (the final-LayerNorm'd class token, the input of ``head``).
        num_exits: 1.
        num_classes: as given.
        distilled: as given.
        num_patches: ``(image_size / patch_size)²``.
        num_prefix_tokens: 1, or 2 when distilled (class token first, then the distillation token).
        fc: alias of ``head`` (the class-token classifier), as on the CNNs.
    """

    num_exits = 1

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        distilled: bool = False,
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if patch_size < 1 or image_size < patch_size or image_size % patch_size:
            raise ValueError(f"VisionTransformer: image_size must be a positive multiple of the patch size "
                             f"(patch_size={patch_size}), got image_size={image_size}")
        if dim % num_heads:
            raise ValueError(f"VisionTransformer: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if depth < 1:
            raise ValueError(f"VisionTransformer: depth must be >= 1, got {depth}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.feature_dim = dim
        self.distilled = distilled
        self.num_patches = (image_size // patch_size) ** 2
        self.num_prefix_tokens = 2 if distilled else 1

        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.num_patches, dim))
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # torch.linspace(0, drop_path, depth)
        self.blocks = nn.Sequential(*(EncoderBlock(dim, num_heads, mlp_ratio, rate) for rate in rates))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if distilled else None

        # DeiT's order: position embeddings, tokens, then the modules.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        init_vit_weights(self)

    @property
    def fc(self) -> nn.Linear:
        """The class-token classifier ``head`` (the name the CNNs use): ``fc(features)`` is the class logits."""
        return self.head

    def forward_tokens(self, x: Tensor) -> Tensor:
        """All tokens after the final LayerNorm.

        Args:
            x: ``(B, in_channels, image_size, image_size)`` float images, any memory format.

        Returns:
            ``(B, num_prefix_tokens + num_patches, dim)`` float32 (bfloat16 under autocast): the class token,
            then the distillation token when distilled, then the patches in row-major order.
        """
        if x.dim() != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"VisionTransformer: expected images (B, C, {self.image_size}, {self.image_size}) "
                             f"(the position embeddings are sized for image_size={self.image_size}), "
                             f"got {tuple(x.shape)}")
        # (B, dim, h, w) -> (B, h·w, dim). Under channels_last the conv output is already (B, h, w, dim) in memory,
        # so the transpose is free.
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        batch = x.shape[0]
        # Parameters are float32; under autocast the conv output is bfloat16: cast the tokens to match for cat.
        prefix = [self.cls_token] if self.dist_token is None else [self.cls_token, self.dist_token]
        prefix = [t.to(x.dtype).expand(batch, -1, -1) for t in prefix]
        x = torch.cat([*prefix, x], dim=1) + self.pos_embed.to(x.dtype)
        return self.norm(self.blocks(x))

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and the class-token features.

        Args:
            x: ``(B, in_channels, image_size, image_size)`` float images, any memory format.

        Returns:
            ``(logits, features)``, float32 (bfloat16 under autocast). ``features`` is ``(B, feature_dim)``, the
            final-LayerNorm'd class token, and ``self.fc(features)`` is the class head's logits. ``logits`` is
            ``(B, num_classes)`` for a plain model; for a distilled one ``(2, B, num_classes)`` stacked
            ``[class head, distillation head]`` in training mode, their mean ``(B, num_classes)`` in eval mode.
        """
        tokens = self.forward_tokens(x)
        features = tokens[:, 0]
        logits = self.head(features)
        if self.head_dist is None:
            return logits, features
        logits_dist = self.head_dist(tokens[:, 1])
        if self.training:
            return torch.stack([logits, logits_dist]), features
        return (logits + logits_dist) / 2, features

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, image_size, image_size)`` float images → logits, shaped as in :meth:`forward_features`."""
        return self.forward_features(x)[0]


@dataclass(frozen=True)
class ViTLayout:
    """Hyper-parameters of a registered ViT (everything but the image size, classes and input channels)."""

    patch_size: int
    dim: int
    depth: int
    num_heads: int
    mlp_ratio: float
    drop_path: float
    distilled: bool


_DEIT_TI = dict(dim=192, depth=12, num_heads=3, mlp_ratio=4.0, drop_path=0.1)  # DeiT-Ti, stochastic depth 0.1
_MICRO = dict(dim=64, depth=4, num_heads=2, mlp_ratio=4.0, drop_path=0.0)  # CPU-sized: ~0.2M parameters

VIT_LAYOUTS: dict[str, ViTLayout] = {
    "deit_tiny": ViTLayout(patch_size=16, **_DEIT_TI, distilled=False),
    "deit_tiny_distilled": ViTLayout(patch_size=16, **_DEIT_TI, distilled=True),
    "vit_tiny_32": ViTLayout(patch_size=4, **_DEIT_TI, distilled=False),
    "vit_tiny_32_distilled": ViTLayout(patch_size=4, **_DEIT_TI, distilled=True),
    "vit_micro_32": ViTLayout(patch_size=4, **_MICRO, distilled=False),
    "vit_micro_32_distilled": ViTLayout(patch_size=4, **_MICRO, distilled=True),
}


def vit(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 32) -> VisionTransformer:
    """Build the registered ViT ``name`` (a key of :data:`VIT_LAYOUTS`) for ``image_size`` px inputs.

    Raises:
        ValueError: ``image_size`` is not a multiple of the layout's patch size (the message names both).
    """
    layout = VIT_LAYOUTS[name]
    return VisionTransformer(image_size=image_size, patch_size=layout.patch_size, dim=layout.dim, depth=layout.depth,
                             num_heads=layout.num_heads, mlp_ratio=layout.mlp_ratio, drop_path=layout.drop_path,
                             distilled=layout.distilled, num_classes=num_classes, in_channels=in_channels)
