import pytest
import torch

from service.fnn import FNN, FNNConfig, fnn_from_bytes, fnn_to_bytes, train_fnn


def toy(n=400, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=g)
    direction = torch.zeros(d)
    direction[0] = 1.0
    normal = base - 1.5 * direction
    anomalous = base + 1.5 * direction
    return normal, anomalous


def test_fnn_layout_is_four_linear_layers():
    fnn = FNN(640)
    assert fnn.layout == [640, 512, 256, 128, 1]
    assert sum(isinstance(m, torch.nn.Linear) for m in fnn.modules()) == 4


def test_fnn_learns_separable_toy_problem():
    normal, anomalous = toy()
    fnn, report = train_fnn(normal, anomalous, FNNConfig(max_epochs=30, seed=0))
    assert report.val_auroc > 0.97
    test_n, test_a = toy(seed=1)
    assert fnn.score(test_a).mean() > 0.8 and fnn.score(test_n).mean() < 0.2


def test_training_is_reproducible_for_a_seed():
    normal, anomalous = toy(n=120)
    cfg = FNNConfig(max_epochs=5, seed=3)
    a, _ = train_fnn(normal, anomalous, cfg)
    b, _ = train_fnn(normal, anomalous, cfg)
    c, _ = train_fnn(normal, anomalous, FNNConfig(max_epochs=5, seed=4))
    x = torch.randn(10, 16)
    assert torch.equal(a.score(x), b.score(x))
    assert not torch.equal(a.score(x), c.score(x))


def test_fnn_serialisation_round_trip_and_layout_check():
    fnn = FNN(16, (8, 8, 4))
    data = fnn_to_bytes(fnn)
    back = fnn_from_bytes(data, fnn.layout)
    x = torch.randn(5, 16)
    assert torch.equal(fnn.score(x), back.score(x))
    with pytest.raises(ValueError, match="do not match"):
        fnn_from_bytes(data, [32, 8, 8, 4, 1])


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="paired"):
        train_fnn(torch.randn(10, 4), torch.randn(9, 4))


def test_rank_auroc_equals_scikit_learn_with_ties():
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from service.fnn import auroc

    rng = np.random.default_rng(0)
    labels = torch.tensor(rng.integers(0, 2, 200))
    scores = torch.tensor(np.round(rng.normal(size=200) + 0.5 * labels.numpy(), 1))  # rounded: many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
