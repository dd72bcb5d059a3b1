"""The trainer's local term: window labels follow the defect mask, and the term teaches windows where a defect is."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.synthetic.data import TwinBatches, make_twin_pair
from service.synthetic.train_clip import TrainClipConfig, build_model, local_loss, preprocess, window_targets
from service.window_grid import window_indices
from service.windows import cnn_feature_map, cnn_window_embeddings


def test_a_small_flaw_labels_the_windows_that_hold_it_and_leaves_the_grazed_ones_out():
    mask = torch.zeros(1, 60, 60, dtype=torch.bool)
    mask[0, 22:28, 22:28] = True  # inside cell (2, 2) of a 6x6 grid of 10-px cells
    cells = window_targets(mask, (6, 6), window_indices(6, 6, 1, 1)).reshape(6, 6)
    assert cells[2, 2] == 1 and torch.nansum(cells) == 1 and not cells.isnan().any()
    pairs = window_targets(mask, (6, 6), window_indices(6, 6, 2, 1)).reshape(5, 5)
    assert {tuple(rc) for rc in torch.nonzero(pairs == 1).tolist()} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert (pairs[3:, :] == 0).all() and (pairs[:, 3:] == 0).all()

    graze = torch.zeros(1, 60, 60, dtype=torch.bool)
    graze[0, 22:28, 22:31] = True  # 48 pixels in cell (2, 2), a 6-pixel sliver in cell (2, 3)
    cells = window_targets(graze, (6, 6), window_indices(6, 6, 1, 1)).reshape(6, 6)
    assert cells[2, 2] == 1 and cells[2, 3].isnan(), "a sliver is neither the defect nor clean: left out"
    assert torch.nansum(cells) == 1


def test_a_large_defect_labels_every_window_it_covers_a_tenth_of():
    mask = torch.zeros(1, 60, 60, dtype=torch.bool)
    mask[0, :, :30] = True  # the left half
    cells = window_targets(mask, (6, 6), window_indices(6, 6, 1, 1)).reshape(6, 6)
    assert (cells[:, :3] == 1).all() and (cells[:, 3:] == 0).all()


def test_a_twin_pair_carries_the_mask_of_its_visible_defect():
    shown = [make_twin_pair(5, i, 48, crop_prob=0.0) for i in range(12)]
    for pair in shown:
        assert pair.mask.shape == (48, 48) and pair.mask.any()
        diff = np.abs(pair.defective.astype(int) - pair.clean.astype(int)).max(axis=-1)
        assert diff[pair.mask].mean() > 4 * max(diff[~pair.mask].mean(), 0.25)
    hidden = [p for p in (make_twin_pair(9, i, 48, crop_prob=1.0) for i in range(120)) if not p.defect_visible]
    assert hidden and not any(p.mask.any() for p in hidden)
    batch = TwinBatches(5, 4, 48, 1, crop_prob=0.0)[0]
    assert batch["masks"].shape == (4, 48, 48) and batch["masks"].dtype == torch.bool


def test_the_local_term_teaches_windows_where_the_defect_is():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = TrainClipConfig(batch=16, render_size=32, image_size=64, embed_dim=32, vision_width=8, text_width=32,
                          text_layers=1, text_heads=2, context_length=64, device="cpu", workers=0, crop_prob=0.0)
    model = build_model(cfg).train()
    batch = TwinBatches(0, 8, 32, 1, crop_prob=0.0, context_length=64)[0]
    images = preprocess(batch["images"], 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        fmap = cnn_feature_map(model.visual, images)
        txt = torch.nn.functional.normalize(model.encode_text(batch["tokens"]), dim=-1)
        return fmap, txt

    def loss() -> torch.Tensor:
        fmap, txt = forward()
        return local_loss(model.visual, fmap, txt, torch.tensor(10.0), batch["masks"], batch["visible"], (1, 2))

    with torch.no_grad():
        first = float(loss())
    assert math.isfinite(first) and first == pytest.approx(math.log(2), abs=0.3)
    for _ in range(25):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    with torch.no_grad():
        assert float(loss()) < 0.6 * first
        # Direction, not only fit: on the cells (scale 1), cos to the defect caption minus cos to the clean one is
        # higher where the mask says defect than on the same twin's clean cells and on the clean twins.
        fmap, txt = forward()
        grid = tuple(fmap.shape[-2:])
        idx = window_indices(*grid, 1, 1)
        emb = torch.nn.functional.normalize(cnn_window_embeddings(model.visual, fmap, idx, chunk=1024), dim=-1)
        gap = txt[8:] - txt[:8]
        margin = torch.einsum("bnd,bd->bn", emb, torch.cat([gap, gap]))
        target = window_targets(batch["masks"], grid, idx)
        defect = margin[8:][target == 1]
        assert len(defect) > 0
        assert defect.mean() > margin[8:][target == 0].mean() + 0.05
        assert defect.mean() > margin[:8].mean() + 0.05


def test_training_with_the_local_term_logs_it_and_keeps_the_global_loss():
    import json

    from service.synthetic.train_clip import train

    cfg = dict(steps=4, batch=8, lr=2e-3, warmup=1, render_size=32, image_size=64, embed_dim=32, vision_width=8,
               text_width=32, text_layers=1, text_heads=2, context_length=64, device="cpu", workers=0, log_every=1,
               centre_images=8, centre_captions=8)
    torch.set_num_threads(1)
    lines: list[str] = []
    both = train(TrainClipConfig(**cfg, local_weight=1.0), progress=False, log=lines.append)
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(0 < r["local"] < r["loss"] for r in rows)
    plain = train(TrainClipConfig(**cfg), progress=False, log=lambda _: None)
    moved = both.model.visual.attnpool.positional_embedding - plain.model.visual.attnpool.positional_embedding
    assert moved.abs().max() > 1e-6, "the local term's gradient reaches the weights"
    # The first step sees the same weights and data: the total is the global loss plus the local term.
    assert both.losses[0] == pytest.approx(plain.losses[0] + rows[0]["local"], abs=1e-3)
