"""A finer final feature grid for open_clip's ModifiedResNet without new parameters ("tower" options).

Why: WinCLIP windows are made of final-map cells, and open_clip's ResNet downsamples 32x, so a 64-px part gave a
2x2 map and was upsampled 3x to get 6x6, where a 10-px flaw is a fraction of one cell. Two changes give stride 8
at the same feature scales, DeepLab-style: the stem's first conv runs at stride 1 (the image is rendered at the
model's native size instead of being upsampled 2x first) and `layer4` keeps its resolution, with its 3x3 convs
dilated 2x so their receptive field in image units is unchanged. Parameter shapes stay the same except the
attention pool's positional embedding, which gets one row per cell of the finer map; so a model trained with the
old stride can start the new one (`resize_attnpool`).

Options live in the CLIP's store manifest under "tower" (open_clip's own config has no such keys):
`{"stem_stride": 1, "layer4_stride": 1, "layer4_dilation": 2}`; every loader of a store CLIP calls `apply_tower`
before loading weights.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TOWER_KEYS = ("stem_stride", "layer4_stride", "layer4_dilation")
FINE_TOWER: dict[str, int] = {"stem_stride": 1, "layer4_stride": 1, "layer4_dilation": 2}  # stride 32 -> 8


def is_resnet(visual: nn.Module) -> bool:
    """open_clip's ModifiedResNet image tower (works on a meta-device model too)."""
    return hasattr(visual, "attnpool") and hasattr(visual, "layer4") and hasattr(visual, "conv1")


def cnn_stride(visual: nn.Module) -> int:
    """Input pixels per final-map cell of a ModifiedResNet, read from its modules (32 for open_clip's own)."""
    stride = int(visual.conv1.stride[0])
    if isinstance(getattr(visual, "avgpool", None), nn.AvgPool2d):
        stride *= int(visual.avgpool.kernel_size)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(visual, name):
            if isinstance(block.avgpool, nn.AvgPool2d):
                k = block.avgpool.kernel_size
                stride *= int(k if isinstance(k, int) else k[0])
    return stride


def apply_tower(model: nn.Module, options: dict[str, Any] | None) -> nn.Module:
    """Rewire `model.visual` (a ModifiedResNet) in place per `options`; a no-op for None/{}. Returns the model.

    Must run before the weights load: it reallocates the attention pool's positional embedding for the new grid.
    """
    if not options:
        return model
    unknown = set(options) - set(TOWER_KEYS)
    if unknown:
        raise ValueError(f"unknown tower options {sorted(unknown)} (known: {', '.join(TOWER_KEYS)})")
    visual = model.visual
    if not is_resnet(visual):
        raise ValueError("tower options apply to a ModifiedResNet image tower only")
    stem_stride = int(options.get("stem_stride", 2))
    visual.conv1.stride = (stem_stride, stem_stride)
    if int(options.get("layer4_stride", 2)) == 1:
        first = visual.layer4[0]
        first.avgpool = nn.Identity()
        if first.downsample is not None:
            first.downsample[0] = nn.Identity()  # the "-1" avgpool in front of the 1x1 projection
    dilation = int(options.get("layer4_dilation", 1))
    for block in visual.layer4:
        block.conv2.dilation = (dilation, dilation)
        block.conv2.padding = (dilation, dilation)
    side = int(visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size)
    side //= cnn_stride(visual)
    pos = visual.attnpool.positional_embedding
    if pos.shape[0] != side * side + 1:
        visual.attnpool.positional_embedding = nn.Parameter(resize_attnpool(pos.detach(), side))
    return model


def resize_attnpool(pos: torch.Tensor, side: int) -> torch.Tensor:
    """[1 + n*n, C] positional embedding -> [1 + side*side, C] (bicubic over the grid, the class row kept)."""
    n = int(round((pos.shape[0] - 1) ** 0.5))
    if n == side:
        return pos.clone()
    grid = pos[1:].float().reshape(1, n, n, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    rest = grid.permute(0, 2, 3, 1).reshape(side * side, -1).to(pos.dtype)
    return torch.cat([pos[:1], rest], dim=0)


@torch.no_grad()
def fold_batchnorm(visual: nn.Module) -> int:
    """Fold every eval-mode BatchNorm of a ModifiedResNet into the conv before it; returns how many were folded.

    Why: in inference a BatchNorm is a per-channel affine map, so it can live in the conv's weight and bias; the
    tower then makes one pass over each activation instead of two. On the embedded model's narrow convs (16-128
    channels) that pass is memory-bound: `benchmarks/bn_fold.py`. The arithmetic is done in fp32 and cast to the
    conv's dtype: give it fp32 weights and cast afterwards (as `load_clip` does) to round once. Pairs are open_clip's:
    `convN`/`bnN` of the stem and the bottlenecks, and a downsample's `0`/`1`. Training code never calls this (the
    statistics would stop updating), nor does anything that needs the weights file's own tensors.
    """
    if not is_resnet(visual):
        return 0
    folded = 0
    for module in list(visual.modules()):
        pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
        if isinstance(module, nn.Sequential):
            pairs = [("0", "1")]
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or bn.training:
                continue
            scale = bn.weight.float() / torch.sqrt(bn.running_var.float() + bn.eps)
            bias = bn.bias.float() - bn.running_mean.float() * scale
            if conv.bias is not None:
                bias = bias + conv.bias.float() * scale
            dtype = conv.weight.dtype
            conv.weight.copy_((conv.weight.float() * scale[:, None, None, None]).to(dtype))
            conv.bias = nn.Parameter(bias.to(dtype=dtype, device=conv.weight.device), requires_grad=False)
            setattr(module, bn_name, nn.Identity())
            folded += 1
    return folded


def resnet_global(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """A ModifiedResNet's output [B, D] for pixels at its native size: stem, layers, then the attention pool for its
    one output token (`attnpool_first_token`). Equal to `visual(pixels)` up to float rounding, for less work."""
    x = visual.stem(pixels)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    if not all(type(getattr(pool, n)) is nn.Linear for n in ("q_proj", "k_proj", "v_proj", "c_proj")):
        return pool(x)  # swapped projections (e.g. benchmarks/int8.py's quantised ones): the module's own forward
    return attnpool_first_token(pool, x)


def attnpool_first_token(pool: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """What open_clip's `AttentionPool2d` returns for a final map [B, C, h, w]: its first (mean) token's output.

    The module queries every token and projects every token's output, then keeps the first; here only that token's
    query is made, and no token gets a key or a value of its own (`benchmarks/global_pool.py` times the three). Per
    head h, with x_i the tokens (positions added):
      q_h . (Wk_h x_i + bk_h) = (Wk_h^T q_h) . x_i + const,  so the softmax needs only u_h = Wk_h^T q_h (the key
                                                               bias shifts every score alike and drops out);
      sum_i a_hi (Wv_h x_i + bv_h) = Wv_h (sum_i a_hi x_i) + bv_h,  as the weights a_h sum to 1.
    That is about 3 C^2 multiply-adds of projection per image instead of 2 (1 + h*w) C^2 for the keys and values
    (74 C^2 on a 6x6 map), plus 2 C (1 + h*w) per head for the scores and the weighted sum: equal up to float
    rounding (tested against the module)."""
    b, c, h, w = fmap.shape
    heads = pool.num_heads
    hd = c // heads
    x = fmap.reshape(b, c, h * w).transpose(1, 2)  # [B, h*w, C]
    x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + pool.positional_embedding.to(x.dtype)  # [B, N, C]
    q = F.linear(x[:, 0], pool.q_proj.weight, pool.q_proj.bias).view(b, heads, hd) * hd ** -0.5
    u = torch.bmm(q.transpose(0, 1), pool.k_proj.weight.view(heads, hd, c)).transpose(0, 1)  # [B, heads, C]
    attn = torch.bmm(u, x.transpose(1, 2)).float().softmax(dim=-1).to(x.dtype)  # [B, heads, N]; the softmax in fp32
    z = torch.bmm(attn, x)  # [B, heads, C]: each head's attention-weighted token
    o = torch.bmm(z.transpose(0, 1), pool.v_proj.weight.view(heads, hd, c).transpose(1, 2)).transpose(0, 1)
    o = o + pool.v_proj.bias.view(heads, hd)  # [B, heads, hd]
    return F.linear(o.reshape(b, c), pool.c_proj.weight, pool.c_proj.bias)
