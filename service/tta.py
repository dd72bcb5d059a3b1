"""Test-time augmentation: the global image embedding averaged over dihedral views (flips, quarter turns) of the input.

Why: an inspection camera looks down on parts that lie in any orientation, so whether a part is normal does not depend
on how it is turned. A small CLIP's embedding does depend on it a little, and that noise moves the image score.
Averaging the embeddings of a few flipped and rotated copies removes most of it. `benchmarks/tta_views.py` picks the
count on validation kinds (the random-shape widgets and patterns, a new seed): for the embedded model 4 views raised
their image AUROC from 0.951 to 0.962; the README has the held-out figures.

Only the global embedding is averaged. Windows still come from the unturned input, so a heatmap costs the same, and
the averaged image score still enters every map through WinCLIP's harmonic mean. Views are taken of the square,
normalised model input, so the geometry back to the original image is untouched.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import VIEW_COUNTS


def dihedral_views(pixels: torch.Tensor, n_views: int) -> list[torch.Tensor]:
    """The first `n_views` of: identity, left-right flip, up-down flip, half turn, then the four views through the
    transpose. Each prefix of 1, 2, 4 or 8 is a group, so no orientation is favoured. `pixels` is [B, C, S, S]."""
    if n_views not in VIEW_COUNTS:
        raise ValueError(f"n_views must be one of {VIEW_COUNTS}, got {n_views}")
    if pixels.shape[-1] != pixels.shape[-2]:
        raise ValueError(f"views need a square input, got {tuple(pixels.shape[-2:])}")
    t = pixels.transpose(-1, -2)
    views = [pixels, pixels.flip(-1), pixels.flip(-2), pixels.flip(-2, -1), t, t.flip(-1), t.flip(-2), t.flip(-2, -1)]
    return views[:n_views]


def average_embeddings(per_view: list[torch.Tensor]) -> torch.Tensor:
    """L2-normalised mean of the views' (already normalised) embeddings, each [B, D]."""
    return F.normalize(torch.stack([e.float() for e in per_view]).mean(0), dim=-1)


CPU_IMAGES_PER_FORWARD = 8
# A heatmap pass's backbone forward also takes the batch's other views while it stays within this many images on the
# CPU (`Detector._views_in_window_pass`): per image, 24 images in one forward beat the window pass plus grouped view
# forwards, 32 did not (`benchmarks/views_in_window_pass.py --batches 4,6,8`).
CPU_WINDOW_PASS_IMAGES = 24


def encode_global(backend, pixels: torch.Tensor, n_views: int = 1, identity: torch.Tensor | None = None) -> torch.Tensor:
    """Global embeddings [B, D] of `pixels` averaged over `n_views` dihedral views.

    `identity` is the embedding of the unturned input when the caller already has it (the heatmap pass computes it
    with the windows), so it is not computed twice. On a GPU all views go through one forward. On a CPU, forwards of
    more than about 8 images get slower per image (they fall out of cache: 4 views of 32 images took 1.14 s in one
    forward and 0.57 s in four), so views are grouped into forwards of at most max(B, 8) images.
    """
    from .preprocess import cnn_layout

    visual = getattr(getattr(backend, "model", None), "visual", None)
    if n_views == 1:
        return identity if identity is not None else backend.encode_image(cnn_layout(pixels, visual))
    views = dihedral_views(pixels, n_views)
    todo = views[1:] if identity is not None else views
    b = pixels.shape[0]
    per_forward = len(todo) if pixels.device.type != "cpu" else max(1, max(b, CPU_IMAGES_PER_FORWARD) // b)
    out: list[torch.Tensor] = []
    for i in range(0, len(todo), per_forward):
        out += backend.encode_image(cnn_layout(torch.cat(todo[i:i + per_forward]), visual)).split(b)
    per_view = ([identity] if identity is not None else []) + out
    return average_embeddings(per_view).to(per_view[0].dtype)
