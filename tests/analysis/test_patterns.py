"""Pattern summaries: maps are re-centred on their query (images and text), the autoencoder + k-means separate two
planted pattern families and the head histogram follows them, and collection from a real tiny ViT."""

from __future__ import annotations

import pytest
import torch

from attnpatch.analysis import Geometry, PatternCollector, collect_patterns, summarize_patterns
from attnpatch.analysis.pattern_clusters import fill_outside
from attnpatch.analysis.patterns import PatternSet

from analysis_fixtures import left_neighbour_call, previous_token_call, tiny_vit

pytest.importorskip("sklearn")


def test_image_maps_are_centred_on_the_query():
    collector = PatternCollector(Geometry("image", prefix=1, grid=(3, 4)), queries=5, block_elements=30)
    collector(left_neighbour_call((3, 4), prefix=1, batch=2))
    pats = collector.result()
    assert pats.maps.shape == (2 * 5 * 2, 5, 7)  # 2 images x 5 queries x 2 heads, offsets (-2..2) x (-3..3)
    left = pats.maps[pats.head == 0]
    # all mass one step left of the centre (2, 3), or one step right for queries in column 0
    at_left, at_right = left[:, 2, 2], left[:, 2, 4]
    assert bool(((at_left > 0.999) | (at_right > 0.999)).all())
    uniform = pats.maps[pats.head == 1]
    assert torch.allclose(uniform.sum((1, 2)), torch.full((10,), 12 / 13))  # CLS share left out
    assert int((uniform[0] > 0).sum()) == 12  # exactly the grid's 12 patches, wherever the query sits
    assert torch.equal(pats.support[pats.head == 1], uniform > 0)
    # filled outside the grid, a uniform map is the same constant wherever its query sits
    filled = fill_outside(uniform, pats.support[pats.head == 1])
    torch.testing.assert_close(filled, torch.full_like(filled, 1 / 13))


def test_text_maps_put_special_tokens_first_and_offset_zero_last():
    collector = PatternCollector(Geometry("text", prefix=1), queries=3, window=4)
    collector(previous_token_call([7, 5]))
    pats = collector.result()
    assert pats.maps.shape == (2 * 3 * 2, 1, 5) and pats.window == 4
    prev, sink = pats.maps[pats.head == 0, 0], pats.maps[pats.head == 1, 0]
    assert torch.allclose(sink[:, 0], torch.ones(6))  # head 1: all on the first token
    # head 0: offset -1 (column 3), or the special column when the query is the second token
    assert bool(((prev[:, 3] > 0.999) | (prev[:, 0] > 0.999)).all())


def planted_families(n: int = 300, seed: int = 0) -> PatternSet:
    """Head 0 of layer 0 draws family A (a vertical bar through the query), head 1 family B (a horizontal bar),
    both at random strengths, with noise."""
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(2 * n, 7, 7, generator=gen) * 0.15
    strength = 0.5 + torch.rand(2 * n, generator=gen)
    maps[:n, :, 3] += strength[:n, None]
    maps[n:, 3, :] += strength[n:, None]
    maps /= maps.sum((1, 2), keepdim=True)
    head = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    return PatternSet(Geometry("image"), maps, torch.zeros(2 * n, dtype=torch.long), head, {0: 2})


def test_autoencoder_clusters_separate_two_planted_families():
    from sklearn.metrics import adjusted_rand_score

    pats = planted_families()
    summary = summarize_patterns(pats, clusters=2, latent=4, steps=400)
    assert adjusted_rand_score(pats.head.numpy(), summary.labels.numpy()) > 0.95
    hist = summary.histogram[0]  # [heads, clusters]
    assert hist.shape == (2, 2) and bool((hist.amax(-1) > 0.95).all()) and hist[0].argmax() != hist[1].argmax()
    a = summary.representatives[int(hist[0].argmax())]
    assert a[:, 3].mean() > 3 * a[3, [0, 1, 5, 6]].mean()  # family A's mean map is the vertical bar
    assert summary.loss < 0.02 and summary.sizes() in ([300, 300], [299, 301], [301, 299])
    assert summary.to_dict()["dominant_cluster"] == [summary.dominant()[0].tolist()]


def test_patterns_from_a_tiny_vit_and_errors():
    model = tiny_vit(seed=2, layers=3)
    x = {"pixel_values": torch.randn(4, 1, 16, 16)}
    pats = collect_patterns(model, x, Geometry("image", prefix=1), queries=3, layers=[0, 2])
    assert pats.maps.shape == (2 * 4 * 3 * 4, 7, 7) and pats.num_heads == {0: 4, 2: 4}
    assert set(pats.layer.tolist()) == {0, 2} and bool((pats.maps.sum((1, 2)) < 1).all())
    with pytest.raises(ValueError, match="cannot form 500 clusters"):
        summarize_patterns(pats, clusters=500)
    with pytest.raises(ValueError, match="queries and window must be >= 1"):
        PatternCollector(Geometry("text"), queries=0)
    with pytest.raises(RuntimeError, match="no attention map was collected"):
        PatternCollector(Geometry("text")).result()
