"""Few-shot mode (WinCLIP+): embeddings, the memory, its scoring against a slow reference of anomalib's formulas,
leave-one-out, the coreset and serialisation (the database store: tests/test_memory_db.py).

The reference below is written from WinCLIP's few-shot path (anomalib `winclip/torch_model.py` / `utils.py`, the
paper's eq. 4) as plainly as possible: per-window and per-patch loops, explicit nearest neighbours, no shared code
with `service/fewshot.py` or `service/aggregate.py`. ViT embeddings are taken from open_clip's own forward
(`output_tokens`) and from windows masked out of the token sequence and sent through the module's transformer, as
anomalib does.
"""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from service.aggregate import upsample_map
from service.detector import Detector, ImageEmbedding
from service.fewshot import (
    DENSE_RADIUS,
    DENSE_SQUASH,
    ReferenceMemory,
    ReferenceMemoryError,
    association,
    build_memory,
    dense_near,
    greedy_coreset,
    model_ref,
)
from service.fnn import FNN
from service.preprocess import Geometry
from service.scoring import PromptAnchors
from service.settings import Settings
from service.windows import embed_image_and_windows
from tests.helpers_models import tiny_backend

T = 0.07


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return tiny_backend(tmp_path_factory.mktemp("fs_vit"), "vit", seed=3)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return tiny_backend(tmp_path_factory.mktemp("fs_cnn"), "cnn", seed=4)


def _detector(backend, scales=(2, 3)) -> Detector:
    d = backend.embed_dim
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    anchors = PromptAnchors("object", F.normalize(torch.randn(d, generator=gen), dim=0),
                            F.normalize(torch.randn(d, generator=gen), dim=0))
    return Detector.from_parts(backend, FNN(d), Settings(device="cpu", precision="fp32"),
                               manifest={"windows": {"scales": list(scales)}}, anchors={"object": anchors})


def _pixels(backend, n, seed):
    s = backend.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _embs(det: Detector, pixels: torch.Tensor) -> list[ImageEmbedding]:
    e = embed_image_and_windows(det.backend, pixels, det.window_scales, 1, 1024, dense=True)
    s = det.backend.image_size
    geo = Geometry(s, s, s, "stretch", (0, 0, s, s), (0, 0, s, s))
    return [ImageEmbedding(e.global_emb[i], {k: w[i] for k, w in e.windows.items()}, e.grid, geo, e.patches[i],
                           e.dense[i] if e.dense is not None else None, e.dense_grid)
            for i in range(pixels.shape[0])]


# --- the slow reference of WinCLIP+ -----------------------------------------------------------------------------------
def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _class_score(f: torch.Tensor, t_n: torch.Tensor, t_a: torch.Tensor) -> float:
    """softmax([cos(f, t_n), cos(f, t_a)] / T)[anomalous] (WinCLIP eq. 1)."""
    logits = torch.tensor([_cos(f, t_n), _cos(f, t_a)], dtype=torch.float64) / T
    return float(torch.softmax(logits, 0)[1])


def _vas(f: torch.Tensor, refs: list[torch.Tensor]) -> float:
    """min over reference embeddings of (1 - cos) / 2 (WinCLIP eq. 4)."""
    return min((1 - _cos(f, r)) / 2 for r in refs)


def _windows(h: int, w: int, k: int) -> list[list[int]]:
    """Row-major k x k windows at stride 1, each as its row-major cell indices."""
    return [[(r + i) * w + (c + j) for i in range(k) for j in range(k)] for r in range(h - k + 1) for c in range(w - k + 1)]


def _harmonic(window_scores: list[float], windows: list[list[int]], n_cells: int) -> list[float]:
    out = []
    for p in range(n_cells):
        covering = [s for s, cells in zip(window_scores, windows) if p in cells]
        out.append(len(covering) / sum(1 / s for s in covering) if all(s > 0 for s in covering) else 0.0)
    return out


def _reference(query: dict, refs: list[dict], t_n, t_a, grid, scales) -> tuple[float, list[float]]:
    """WinCLIP+ image score and flat map of one query from embeddings {'global', 'windows': {k: [n, D]}, 'patches'}."""
    image, zs_map, fs_map = _reference_parts(query, refs, t_n, t_a, grid, scales)
    return (image + max(fs_map)) / 2, [(a + b) / 2 for a, b in zip(zs_map, fs_map)]


def _reference_parts(query: dict, refs: list[dict], t_n, t_a, grid, scales) -> tuple[float, list[float], list[float]]:
    """WinCLIP+'s zero-shot image score, zero-shot flat map and few-shot flat map of one query."""
    h, w = grid
    n = h * w
    image = _class_score(query["global"], t_n, t_a)
    zero = [[image] * n]
    few = [[_vas(query["patches"][p], [r["patches"][q] for r in refs for q in range(n)]) for p in range(n)]]
    for k in scales:
        wins = _windows(h, w, k)
        zero.append(_harmonic([_class_score(f, t_n, t_a) for f in query["windows"][k]], wins, n))
        bank = [r["windows"][k][i] for r in refs for i in range(len(wins))]
        few.append(_harmonic([_vas(f, bank) for f in query["windows"][k]], wins, n))
    zs_map = [len(zero) / sum(1 / m[p] for m in zero) for p in range(n)]
    fs_map = [sum(m[p] for m in few) / len(few) for p in range(n)]
    return image, zs_map, fs_map


@torch.inference_mode()
def _open_clip_vit_embeddings(backend, pixels, scales) -> list[dict]:
    """Embeddings as anomalib takes them: `encode_image` with output_tokens (pooled + projected, and the patch
    tokens after ln_post), and windows masked out of the pre-ln_pre token sequence through the module transformer."""
    visual = backend.model.visual
    visual.output_tokens = True
    try:
        pooled, tokens = visual(pixels)
    finally:
        visual.output_tokens = False
    x = visual.conv1(pixels)  # the tokens anomalib's hook catches: patch embedding + class token + positions
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    seq = torch.cat([cls, x], dim=1) + visual.positional_embedding
    h = w = int(round((seq.shape[1] - 1) ** 0.5))
    out = []
    for b in range(pixels.shape[0]):
        item = {"global": pooled[b].float(), "patches": tokens[b].float(), "windows": {}}
        for k in scales:
            embs = []
            for cells in _windows(h, w, k):
                x = visual.ln_pre(seq[b, [0] + [c + 1 for c in cells]][None])
                x = visual.ln_post(visual.transformer(x))
                embs.append((x[0, 0] @ visual.proj).float())
            item["windows"][k] = embs
        out.append(item)
    return out


def _as_dicts(embs: list[ImageEmbedding]) -> list[dict]:
    return [{"global": e.global_emb, "patches": e.patches, "windows": {k: list(v) for k, v in e.windows.items()}}
            for e in embs]


def test_vit_embeddings_are_open_clips_tokens_and_masked_windows(vit):
    det = _detector(vit)
    px = _pixels(vit, 2, 0)
    ours = _embs(det, px)
    ref = _open_clip_vit_embeddings(vit, px, det.window_scales)
    for e, r in zip(ours, ref):
        assert e.patches.shape == r["patches"].shape  # transformer width, not projected (as WinCLIP's few-shot path)
        torch.testing.assert_close(e.patches, F.normalize(r["patches"], dim=-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(e.global_emb, F.normalize(r["global"], dim=-1), atol=1e-5, rtol=0)
        for k in det.window_scales:
            torch.testing.assert_close(e.windows[k], F.normalize(torch.stack(r["windows"][k]), dim=-1), atol=1e-5,
                                       rtol=0)


@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("k_shot", [1, 3])
def test_few_shot_score_and_map_match_the_slow_winclip_reference(vit, cnn, kind, k_shot):
    backend = vit if kind == "vit" else cnn
    det = _detector(backend)
    refs = _embs(det, _pixels(backend, k_shot, 10))
    queries = _embs(det, _pixels(backend, 3, 20))
    anchors = det.anchors()
    memory = build_memory(refs, model_ref(det), 1, 10_000)  # the default: WinCLIP+ exactly (no dense bank)
    assert memory.dense is None
    got = det.score(queries, memory=memory)
    if kind == "vit":  # the reference reads open_clip's own forward: the whole path is compared, not only formulas
        ref_q = _open_clip_vit_embeddings(backend, _pixels(backend, 3, 20), det.window_scales)
        ref_r = _open_clip_vit_embeddings(backend, _pixels(backend, k_shot, 10), det.window_scales)
    else:
        ref_q, ref_r = _as_dicts(queries), _as_dicts(refs)
    for d, q in zip(got, ref_q):
        image, flat = _reference(q, ref_r, anchors.normal, anchors.anomalous, queries[0].grid, det.window_scales)
        assert d.mode == "few_shot" and d.shots == k_shot
        assert abs(d.scores["prompt"] - image) < 1e-4
        assert float(abs(torch.tensor(d.grid["prompt"]).flatten() - torch.tensor(flat)).max()) < 1e-4


def test_few_shot_rule_holds_for_every_score_and_combined_stays_the_weighted_mean(cnn):
    det = _detector(cnn)
    refs, queries = _embs(det, _pixels(cnn, 2, 1)), _embs(det, _pixels(cnn, 2, 2))
    memory = build_memory(refs, model_ref(det), 1, 10_000, dense=True)  # the rule holds on the dense grid too
    zero = det.score(queries)
    few = det.score(queries, memory=memory)
    w = det.settings.combine_weight
    for z, f in zip(zero, few):
        fs_max = None
        for name in ("fnn", "prompt"):
            # map = (zero + few) / 2, the zero-shot map upsampled to the dense bank's finer grid
            fs_map = 2 * f.grid[name] - upsample_map(torch.tensor(z.grid[name]), f.grid[name].shape).numpy()
            fs_max = float(fs_map.max())
            assert abs(f.scores[name] - (z.scores[name] + fs_max) / 2) < 1e-6
        assert abs(f.scores["combined"] - (w * f.scores["fnn"] + (1 - w) * f.scores["prompt"])) < 1e-6
    assert all(z.mode == "zero_shot" for z in zero)


def test_a_shot_scored_against_its_own_memory_is_perfectly_normal_and_leave_one_out_is_not(cnn):
    det = _detector(cnn)
    refs = _embs(det, _pixels(cnn, 3, 7))
    memory = build_memory(refs, model_ref(det), 1, 10_000)
    patches = torch.stack([e.patches for e in refs])
    assert float(association(patches, memory.patches).max()) < 1e-6  # each shot finds itself
    loo = association(patches, memory.patches, memory.patch_src, torch.tensor([0, 1, 2]))
    for i in range(3):  # leaving shot i out equals a memory built without it
        others = build_memory([r for j, r in enumerate(refs) if j != i], model_ref(det), 1, 10_000)
        torch.testing.assert_close(loo[i], association(patches[i:i + 1], others.patches)[0])
    with pytest.raises(ReferenceMemoryError, match="no reference rows"):
        one = build_memory(refs[:1], model_ref(det), 1, 10_000)
        association(patches[:1], one.patches, one.patch_src, torch.tensor([0]))


def test_greedy_coreset_is_farthest_first_and_recorded(cnn):
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [10.0, 1.0], [5.0, 5.0]])
    assert greedy_coreset(x, 3).tolist() == [0, 3, 4]  # (10, 1) is farthest from (0, 0), then (5, 5)
    assert greedy_coreset(x, 9).tolist() == [0, 1, 2, 3, 4]
    det = _detector(cnn)
    refs = _embs(det, _pixels(cnn, 4, 3))
    grid_cells = refs[0].patches.shape[0]
    memory = build_memory(refs, model_ref(det), 1, max_rows=grid_cells + 1)
    assert memory.rows["patches"] == grid_cells + 1
    assert memory.meta["coreset"]["patches"] == {"rows_before": 4 * grid_cells, "rows_after": grid_cells + 1}
    assert memory.patch_src.unique().numel() > 1


def test_serialisation_round_trip_and_refusals(cnn):
    det = _detector(cnn)
    memory = build_memory(_embs(det, _pixels(cnn, 2, 4)), model_ref(det), 1, 10_000, {"product": "nut"})
    data = memory.to_bytes()
    back = ReferenceMemory.from_bytes(data)
    assert back.header() == memory.header() and back.meta["product"] == "nut"
    for s in memory.scales:
        assert torch.equal(back.windows[s], memory.windows[s]) and torch.equal(back.window_src[s], memory.window_src[s])
    assert torch.equal(back.patches, memory.patches)
    for bad in (b"", b"junk" * 10, data[: len(data) // 2], b"\x08" + b"\0" * 7 + b"{}       "):
        with pytest.raises(ReferenceMemoryError):
            ReferenceMemory.from_bytes(bad)


def test_stale_memory_is_refused_with_the_reason(cnn):
    det = _detector(cnn)
    memory = build_memory(_embs(det, _pixels(cnn, 2, 4)), {**model_ref(det), "version": "v9"}, 1, 10_000)
    assert "v9" in memory.incompatibility(model_ref(det), det.window_scales, 1)
    queries = _embs(det, _pixels(cnn, 1, 5))
    with pytest.raises(ReferenceMemoryError, match="cannot score"):
        det.score(queries, memory=memory)
    fresh = build_memory(_embs(det, _pixels(cnn, 2, 4)), model_ref(det), 1, 10_000)
    assert fresh.incompatibility(model_ref(det), (1, 2), 1) is not None  # other window scales
    assert fresh.incompatibility(model_ref(det), det.window_scales, 1) is None


def test_detect_uses_the_memory_without_a_heatmap_too(cnn):
    det = _detector(cnn)
    s = cnn.image_size
    good = [Image.new("RGB", (s, s), (100, 120, 140)), Image.new("RGB", (s, s), (102, 118, 141))]
    memory = build_memory(det.embed(good, heatmap=True), model_ref(det), 1, 10_000)
    with_map = det.detect(good[:1], memory=memory)[0]
    no_map = det.detect(good[:1], heatmap=False, memory=memory)[0]
    assert no_map.mode == "few_shot" and not no_map.heat and with_map.heat
    assert no_map.scores == pytest.approx(with_map.scores, abs=1e-9)


# --- the dense bank (CNN towers) --------------------------------------------------------------------------------------
def _dense_reference(query: ImageEmbedding, refs: list[ImageEmbedding], zero_image: float, zs_map: list[float],
                     fs_map: list[float], grid, radius: float = DENSE_RADIUS, squash: float = DENSE_SQUASH
                     ) -> tuple[float, torch.Tensor]:
    """Image score and final map [dh, dw] with a dense bank, cell by cell: the scale q is the 99th percentile of each
    shot's cells' nearest-neighbour association among the OTHER shots' cells within `radius` cells of it;
    t = tanh(d / (squash q)), d the same search against every shot; few-shot map = (WinCLIP+ few-shot map upsampled + t) / 2;
    final = (zero-shot map upsampled + few-shot map) / 2."""
    dh, dw = query.dense_grid

    def near(p: int, r: int) -> bool:
        return abs(p // dw - r // dw) <= radius and abs(p % dw - r % dw) <= radius

    def nearest(f: torch.Tensor, p: int, shots: list[ImageEmbedding]) -> float:
        rows = torch.stack([o.dense[r] for o in shots for r in range(dh * dw) if near(p, r)])
        return float(((1 - F.normalize(rows, dim=-1) @ F.normalize(f, dim=0)) / 2).min())

    own = [nearest(r.dense[p], p, [o for j, o in enumerate(refs) if j != i])
           for i, r in enumerate(refs) for p in range(r.dense.shape[0])]
    q = float(torch.quantile(torch.tensor(own), 0.99))
    t = torch.tensor([math.tanh(nearest(query.dense[p], p, refs) / (squash * q)) for p in range(dh * dw)]).reshape(dh, dw)
    up = [F.interpolate(torch.tensor(m, dtype=torch.float32).reshape(1, 1, *grid), size=(dh, dw), mode="bilinear",
                        align_corners=False)[0, 0] for m in (zs_map, fs_map)]
    few = (up[1] + t) / 2
    return (zero_image + float(few.max())) / 2, (up[0] + few) / 2


@pytest.mark.parametrize(("k_shot", "radius", "squash"),
                         [(2, DENSE_RADIUS, DENSE_SQUASH), (3, DENSE_RADIUS, DENSE_SQUASH), (3, 2, DENSE_SQUASH),
                          (3, DENSE_RADIUS, 1.0)])
def test_dense_bank_score_and_map_match_the_slow_reference(cnn, k_shot, radius, squash, monkeypatch):
    import functools

    import service.fewshot as fewshot

    monkeypatch.setattr(fewshot, "dense_near", functools.partial(dense_near, radius=radius))  # the scoring's search
    monkeypatch.setattr(fewshot, "DENSE_SQUASH", squash)
    det = _detector(cnn)
    refs = _embs(det, _pixels(cnn, k_shot, 10))
    queries = _embs(det, _pixels(cnn, 3, 20))
    anchors = det.anchors()
    memory = build_memory(refs, model_ref(det), 1, 10_000, dense=True)
    assert memory.dense is not None and memory.dense_grid == refs[0].dense_grid != refs[0].grid
    assert memory.rows["dense"] == k_shot * refs[0].dense.shape[0]
    got = det.score(queries, memory=memory)
    for d, q in zip(got, _as_dicts(queries)):
        zero_image, zs_map, fs_map = _reference_parts(q, _as_dicts(refs), anchors.normal, anchors.anomalous,
                                                      queries[0].grid, det.window_scales)
        image, final = _dense_reference(queries[got.index(d)], refs, zero_image, zs_map, fs_map, queries[0].grid,
                                        radius, squash)
        assert d.mode == "few_shot" and d.shots == k_shot
        assert abs(d.scores["prompt"] - image) < 1e-4
        assert tuple(d.grid["prompt"].shape) == tuple(final.shape)
        assert float(abs(torch.tensor(d.grid["prompt"]) - final).max()) < 1e-4
        assert d.heat["prompt"].shape == (cnn.image_size, cnn.image_size)


def test_a_memory_keeps_the_squash_it_was_built_with_and_older_memories_read_as_two(cnn, monkeypatch):
    """Stored thresholds were fitted with the memory's squash: a later DENSE_SQUASH must not change its scores."""
    import json

    from safetensors.torch import load, save

    import service.fewshot as fewshot

    det = _detector(cnn)
    refs, queries = _embs(det, _pixels(cnn, 3, 12)), _embs(det, _pixels(cnn, 2, 21))
    monkeypatch.setattr(fewshot, "DENSE_SQUASH", 4.0)
    memory = build_memory(refs, model_ref(det), 1, 10_000, dense=True)
    before = [d.scores["prompt"] for d in det.score(queries, memory=memory)]
    monkeypatch.setattr(fewshot, "DENSE_SQUASH", 1.0)
    back = ReferenceMemory.from_bytes(memory.to_bytes())
    assert back.dense_squash == 4.0 and back.header()["dense_squash"] == 4.0
    assert [d.scores["prompt"] for d in det.score(queries, memory=back)] == pytest.approx(before, abs=1e-9)
    # a memory stored before the squash was recorded: made, and calibrated, with tanh(d / 2q)
    data = memory.to_bytes()
    header = json.loads(fewshot._safetensors_metadata(data)["zsad"])
    assert header["format_version"] == fewshot.FORMAT_VERSION == 2  # older code refuses it rather than mis-score it
    del header["dense_squash"]
    header["format_version"] = 1
    legacy = ReferenceMemory.from_bytes(save(load(data), metadata={"zsad": json.dumps(header)}))
    assert legacy.dense_squash == fewshot.LEGACY_DENSE_SQUASH == 2.0
    with pytest.raises(fewshot.ReferenceMemoryError, match="format 3"):
        ReferenceMemory.from_bytes(save(load(data), metadata={"zsad": json.dumps({**header, "format_version": 3})}))
    with pytest.raises(fewshot.ReferenceMemoryError, match="squash"):
        ReferenceMemory.from_bytes(save(load(data), metadata={"zsad": json.dumps({**header, "dense_squash": 0})}))
    as_two = [d.scores["prompt"] for d in det.score(queries, memory=replace(memory, dense_squash=2.0))]
    assert [d.scores["prompt"] for d in det.score(queries, memory=legacy)] == pytest.approx(as_two, abs=1e-9)
    assert as_two != pytest.approx(before, abs=1e-6)


def test_dense_bank_needs_two_shots_can_be_switched_off_and_survives_serialisation(cnn):
    det = _detector(cnn)
    refs = _embs(det, _pixels(cnn, 3, 11))
    one = build_memory(refs[:1], model_ref(det), 1, 10_000, dense=True)
    assert one.dense is None and "2 or more shots" in one.meta["dense"]
    off = build_memory(refs, model_ref(det), 1, 10_000)  # the default: WinCLIP+ only
    assert off.dense is None and off.meta["dense"] == "off"
    memory = build_memory(refs, model_ref(det), 1, 10_000, dense=True)
    back = ReferenceMemory.from_bytes(memory.to_bytes())
    assert back.header() == memory.header() and back.dense_scale == pytest.approx(memory.dense_scale)
    assert torch.equal(back.dense, memory.dense) and torch.equal(back.dense_src, memory.dense_src)
    assert torch.equal(back.dense_pos, memory.dense_pos)
    from dataclasses import replace as dc_replace

    older = ReferenceMemory.from_bytes(dc_replace(memory, dense_pos=None).to_bytes())  # made before positions
    assert older.dense_pos is None and dense_near(older, radius=1) is None  # loads; its search is unlimited
    cells = memory.dense_grid[0] * memory.dense_grid[1]
    for bad in (memory.dense_pos + cells, memory.dense_pos[:-1], memory.dense_pos.float(), -memory.dense_pos - 1):
        with pytest.raises(ReferenceMemoryError, match="dense cell positions"):
            ReferenceMemory.from_bytes(dc_replace(memory, dense_pos=bad).to_bytes())
    queries = _embs(det, _pixels(cnn, 2, 12))
    assert det.score(queries, memory=back)[0].scores == pytest.approx(det.score(queries, memory=memory)[0].scores)
    without_dense = [ImageEmbedding(e.global_emb, e.windows, e.grid, e.geometry, e.patches) for e in queries]
    with pytest.raises(ReferenceMemoryError, match="no dense features"):
        det.score(without_dense, memory=memory)


def test_dense_bank_leave_one_out_and_coreset(cnn):
    det = _detector(cnn)
    refs = _embs(det, _pixels(cnn, 3, 13))
    memory = build_memory(refs, model_ref(det), 1, 10_000, dense=True)
    dense = torch.stack([e.dense for e in refs])
    assert float(association(dense, memory.dense).max()) < 1e-6  # each shot finds itself
    loo = association(dense, memory.dense, memory.dense_src, torch.tensor([0, 1, 2]), near=dense_near(memory))
    assert float(loo.min()) > 0  # the same as the memory's scale is made of
    assert memory.dense_scale == pytest.approx(float(torch.quantile(loo.flatten(), 0.99)))
    small = build_memory(refs, model_ref(det), 1, max_rows=100, dense=True)
    assert small.rows["dense"] == 100 and small.meta["coreset"]["dense"]["rows_before"] == 3 * dense.shape[1]
    # the coreset keeps each row's cell: a kept row is its shot's feature at that cell
    kept = dense[small.dense_src, small.dense_pos]
    assert torch.allclose(F.normalize(kept, dim=-1), small.dense, atol=1e-6)


def test_dense_search_stays_near_the_cell_and_falls_back_when_nothing_is_near():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)  # row 0 at cell 0, row 1 at cell 8 (3x3)
    query = bank[[0]][None].repeat(1, 9, 1)  # every cell looks like row 0
    memory = ReferenceMemory({}, {}, bank, torch.zeros(2, dtype=torch.long), bank[:1], (1, 1), 1, 1, {},
                             dense=bank, dense_src=torch.zeros(2, dtype=torch.long), dense_grid=(3, 3),
                             dense_scale=1.0, dense_pos=torch.tensor([0, 8]))
    near = dense_near(memory, radius=1)
    assert near.shape == (9, 2) and near[0].tolist() == [True, False] and near[8].tolist() == [False, True]
    assert near[4].tolist() == [True, True]  # the centre is within one cell of both corners
    d = association(query, bank, near=near)[0]
    assert float(d[0]) == pytest.approx(0.0, abs=1e-6)  # its own row is near: a match
    assert float(d[8]) == pytest.approx(0.5)  # only row 1 is near: orthogonal, (1 - 0) / 2
    far = association(query, bank, near=torch.zeros(9, 2, dtype=torch.bool))[0]
    assert torch.allclose(far, association(query, bank)[0])  # nothing near: every row, as without positions
    # leave-one-out: cell 0's only near row (row 0, shot 0) is excluded, so it falls back to the other shot's row 1
    src = torch.tensor([0, 1])
    loo = association(query, bank, src, torch.tensor([0]), near=near)[0]
    assert float(loo[0]) == pytest.approx(0.5) and torch.allclose(loo, association(query, bank, src, torch.tensor([0]))[0])
    with pytest.raises(ValueError, match="near must be"):
        association(query, bank, near=near[:1])


def test_dense_features_are_made_only_for_a_dense_memory(cnn):
    det = _detector(cnn)  # default settings: no dense bank is built, so none is embedded
    s = cnn.image_size
    good = [Image.new("RGB", (s, s), (100 + i, 120, 140)) for i in range(3)]
    assert det.embed(good[:1], heatmap=True)[0].dense is None
    memory = build_memory(det.embed(good, heatmap=True, dense=True), model_ref(det), 1, 10_000, dense=True)
    assert memory.dense is not None
    found = det.detect(good[:1], memory=memory)[0]  # the memory's bank asks for the query's dense features
    assert found.mode == "few_shot" and found.grid["prompt"].shape == memory.dense_grid


def test_a_loaded_memory_scores_with_unit_rows_whatever_the_file_holds(cnn):
    """Scoring skips normalising the banks on every call (`association(unit_bank=True)`), so a memory read from bytes
    must hold unit rows even when the file's rows are not (another writer, a hand-edited file)."""
    from dataclasses import replace

    det = _detector(cnn)
    memory = build_memory(_embs(det, _pixels(cnn, 2, 4)), model_ref(det), 1, 10_000, dense=True)
    scaled = replace(memory, patches=memory.patches * 3, windows={s: w * 0.5 for s, w in memory.windows.items()},
                     dense=memory.dense * 2)
    back = ReferenceMemory.from_bytes(scaled.to_bytes())
    for bank in [back.patches, back.dense, *back.windows.values()]:
        assert torch.allclose(bank.norm(dim=-1), torch.ones(bank.shape[0]), atol=1e-6)
    queries = _embs(det, _pixels(cnn, 1, 5))
    # float rounding only (the dense term divides by the shots' small spread); unnormalised rows would be far off
    torch.testing.assert_close(det._few_shot_map(queries, back, None), det._few_shot_map(queries, memory, None),
                               rtol=1e-3, atol=2e-5)
