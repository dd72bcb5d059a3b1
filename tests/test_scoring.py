import math

import torch
import torch.nn.functional as F

from service.fnn import FNN
from service.scoring import (
    Calibration,
    all_scores,
    anchors_from_embeddings,
    combine,
    fit_calibration,
    fnn_logit,
    prompt_logit,
    s_fnn,
    s_pr,
)


def test_prompt_score_matches_the_formula():
    t_n, t_a = F.normalize(torch.tensor([1.0, 0.0]), dim=0), F.normalize(torch.tensor([0.0, 1.0]), dim=0)
    anchors = anchors_from_embeddings("object", t_n[None], t_a[None])
    f = F.normalize(torch.tensor([[3.0, 1.0]]), dim=-1)
    cos_n, cos_a = float(f[0] @ t_n), float(f[0] @ t_a)
    expected = math.exp(cos_a / 0.07) / (math.exp(cos_n / 0.07) + math.exp(cos_a / 0.07))
    assert abs(float(s_pr(f, anchors, 0.07)[0]) - expected) < 1e-6
    assert float(s_pr(f, anchors)[0]) < 0.5  # closer to the normal anchor


def test_scores_keep_leading_shape_and_range():
    torch.manual_seed(0)
    fnn = FNN(8, (8, 8, 4))
    anchors = anchors_from_embeddings("object", torch.randn(5, 8), torch.randn(5, 8))
    emb = torch.randn(2, 7, 8)
    out = all_scores(emb, fnn, anchors, weight=0.25)
    for v in out.values():
        assert v.shape == (2, 7) and (v >= 0).all() and (v <= 1).all()
    assert torch.allclose(out["combined"], 0.25 * out["fnn"] + 0.75 * out["prompt"])
    assert torch.allclose(s_fnn(emb, fnn)[1, 3].float(), fnn.score(emb[1, 3][None])[0])


def test_combine_weights():
    a, b = torch.tensor([1.0]), torch.tensor([0.0])
    assert float(combine(a, b)) == 0.5 and float(combine(a, b, 1.0)) == 1.0


def test_calibration_puts_the_reference_quantile_at_one_half_and_keeps_the_order():
    torch.manual_seed(0)
    fnn = FNN(8, (8, 8, 4))
    anchors = anchors_from_embeddings("object", torch.randn(5, 8), torch.randn(5, 8))
    reference = torch.randn(200, 8)
    cal = fit_calibration(fnn_logit(reference, fnn), prompt_logit(reference, anchors), quantile=0.9)
    calibration = Calibration.from_manifest(cal)
    raw, calibrated = s_fnn(reference, fnn), s_fnn(reference, fnn, calibration)
    assert abs(float((calibrated > 0.5).double().mean()) - 0.1) <= 0.01  # 10% of normal references above 0.5
    assert torch.equal(torch.argsort(raw), torch.argsort(calibrated))  # monotone: rankings (AUROC) unchanged
    p = s_pr(reference, anchors, calibration=calibration)
    assert abs(float((p > 0.5).double().mean()) - 0.1) <= 0.01


def test_scores_do_not_saturate_to_ties():
    big = torch.tensor([20.0, 25.0, 30.0])  # float32 sigmoid rounds all of these to exactly 1.0
    from service.scoring import calibrated_score

    assert len(set(calibrated_score(big, None).tolist())) == 3
