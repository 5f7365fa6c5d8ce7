"""Weighted kNN (InstDisc/DINO): hand-made features with known answers, and a brute force."""
import math

import pytest
import torch

from mscn.train.eval.knn import knn_classify, knn_scores


def _at(deg):
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in deg])


def test_temperature_decides_between_near_and_many():
    # query at 0 deg; one class-1 neighbour at 1 deg, two class-0 neighbours at 10/12 deg
    train = _at([10, 12, 1, 170])
    labels = torch.tensor([0, 0, 1, 2])
    query = _at([0])
    sharp = knn_scores(train, labels, query, 3, k=3, T=0.01)
    flat = knn_scores(train, labels, query, 3, k=3, T=10.0)
    assert sharp.argmax().item() == 1  # exp(cos 1/T) beats 2 exp(cos 10/T) when T is small
    assert flat.argmax().item() == 0  # ~ a plain majority vote when T is large
    assert sharp[0, 2] == 0  # the 4th sample is not among the 3 neighbours
    # votes exp(cos/T), scaled so that the nearest neighbour weighs 1 (no float32 overflow)
    c = [math.cos(math.radians(d)) for d in (1, 10, 12)]
    assert sharp[0, 1].item() == pytest.approx(1.0)
    assert sharp[0, 0].item() == pytest.approx(math.exp((c[1] - c[0]) / 0.01) + math.exp((c[2] - c[0]) / 0.01), rel=1e-3)


def test_matches_brute_force_on_random_features():
    g = torch.Generator().manual_seed(0)
    train, query = torch.randn(200, 16, generator=g), torch.randn(37, 16, generator=g)
    labels = torch.randint(0, 5, (200,), generator=g)
    got = knn_scores(train, labels, query, 5, k=7, T=0.07, chunk=10)  # several chunks
    tn = train / train.norm(dim=1, keepdim=True)
    qn = query / query.norm(dim=1, keepdim=True)
    want = torch.zeros(37, 5)
    for q in range(37):
        sims = [(float(qn[q] @ tn[j]), j) for j in range(200)]
        top = sorted(sims, reverse=True)[:7]
        for s, j in top:
            want[q, labels[j]] += math.exp((s - top[0][0]) / 0.07)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_clustered_features_are_classified_perfectly_and_scale_free():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 32, generator=g) * 5
    train_y, val_y = torch.arange(4).repeat(25), torch.arange(4).repeat(5)
    train = centres[train_y] + 0.3 * torch.randn(100, 32, generator=g)
    val = (centres[val_y] + 0.3 * torch.randn(20, 32, generator=g)) * 100  # cosine: scale is irrelevant
    res = knn_classify(train, train_y, val, val_y, k=20, T=0.07)
    assert res["top1"] == 100.0 and res["top5"] == 100.0 and res["n_train"] == 100 and res["n_val"] == 20
    shuffled = knn_classify(train, train_y[torch.randperm(100, generator=g)], val, val_y, k=20, T=0.07)
    assert shuffled["top1"] < 60.0  # labels carry the answer, not the features alone


def test_k_above_the_training_set_records_the_neighbours_that_voted():
    g = torch.Generator().manual_seed(2)
    train, val = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g)
    train_y, val_y = torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([0, 1, 2, 0])
    res = knn_classify(train, train_y, val, val_y, k=20, T=0.07)
    assert res["k"] == 6  # every training sample voted; k=20 would claim more than ran
    assert knn_classify(train, train_y, val, val_y, k=6, T=0.07)["top1"] == res["top1"]
