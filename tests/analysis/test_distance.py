"""Attention distance profiles: planted heads peak where they should, the streamed statistic equals one computed
from materialised attention maps (synthetic calls and real tiny models: ViT, Gemma-3 with sliding windows and left
padding), bins and errors."""

from __future__ import annotations

import pytest
import torch

from attnpatch.analysis import DistanceAccumulator, Geometry, distance_profile
from attnpatch.analysis.distance import text_edges
from attnpatch.kernels import reference

from analysis_fixtures import left_neighbour_call, previous_token_call, tiny_vit
from tiny_models import tiny_model


def naive(probs, distance, rows, keys, special, edges):
    """Per-head bin mass, special mass and mean distance from full maps probs [B, H, L, L] (python loops)."""
    b_, h_, l_, _ = probs.shape
    bins = len(edges) - 1
    mass = torch.zeros(h_, bins, dtype=torch.float64)
    spec = torch.zeros(h_, dtype=torch.float64)
    dsum = torch.zeros(h_, dtype=torch.float64)
    count = 0
    for b in range(b_):
        for i in range(l_):
            if not rows[b, i]:
                continue
            count += 1
            for j in range(l_):
                p = probs[b, :, i, j].double()
                if not p.any():  # a hidden key (mask, window)
                    continue
                if special[b, j]:
                    spec += p
                elif keys[b, j]:
                    d = float(distance[b, i, j])
                    k = int(torch.bucketize(torch.tensor(d, dtype=torch.float64), edges, right=True)) - 1
                    mass[:, k] += p
                    dsum += p * d
    return mass / count, spec / count, dsum / mass.sum(-1)


def test_left_neighbour_head_peaks_at_distance_one_and_uniform_head_follows_pair_counts():
    call = left_neighbour_call((4, 5), prefix=2)  # non-square grid, 2 prefix tokens (CLS + a register)
    acc = DistanceAccumulator(Geometry("image", prefix=2, grid=(4, 5)), block_elements=64)  # many row blocks
    acc(call)
    prof = acc.result()
    assert prof.centres.tolist() == [0, 1, 2, 3, 4, 5]  # max distance hypot(3, 4) = 5
    assert prof.rows.item() == 2 * 20  # CLS and register rows are left out
    assert float(prof.mass[0, 0, 1]) > 0.999 and float(prof.mean_distance[0, 0]) == pytest.approx(1.0, abs=1e-6)
    assert prof.peak_distance()[0, 0] == 1 and prof.peak_distance("density")[0, 0] == 1
    # head 1 is uniform over all 22 keys: each bin holds its share of the (query, patch key) pairs
    torch.testing.assert_close(prof.mass[0, 1], prof.pairs[0].float() / (prof.rows[0] * 22))
    assert float(prof.special_mass[0, 1]) == pytest.approx(2 / 22)
    torch.testing.assert_close(prof.density()[0, 1], torch.full((6,), 1 / 22))
    assert float(prof.mean_distance[0, 1]) == pytest.approx(float(prof.uniform_distance[0]), rel=1e-6)
    assert prof.layer_trend()["uniform"] == [pytest.approx(float(prof.uniform_distance[0]))]


def test_previous_token_head_peaks_at_one_with_left_padding():
    call = previous_token_call([7, 4, 9])
    acc = DistanceAccumulator(Geometry("text", prefix=1), block_elements=50)
    acc(call)
    prof = acc.result()
    assert prof.edges.tolist()[:5] == [0, 1, 2, 3, 4]
    assert prof.rows.item() == 6 + 3 + 8  # real rows but the first token of each sequence
    # head 0: every row but the second token's puts its mass at distance 1; the second token's previous token is
    # the first (special) token, reported apart
    assert float(prof.mass[0, 0, 1]) == pytest.approx(14 / 17, abs=1e-6) and prof.peak_distance()[0, 0] == 1
    assert float(prof.special_mass[0, 0]) == pytest.approx(3 / 17, abs=1e-6)
    assert float(prof.mean_distance[0, 0]) == pytest.approx(1.0, abs=1e-6)
    assert float(prof.special_mass[0, 1]) > 0.999  # head 1 sinks into the first token


@pytest.mark.parametrize("window", [None, 3])
def test_streamed_profile_equals_materialised_maps_on_random_calls(window):
    call = previous_token_call([9, 6])
    gen = torch.Generator().manual_seed(0)
    call.query = torch.randn(2, 4, 9, 8, generator=gen)
    call.key = call.value = torch.randn(2, 2, 9, 8, generator=gen)  # GQA 4:2
    call.scale, call.softcap = 0.7, 5.0
    if window is not None:
        rows = torch.arange(9)
        call.mask = call.mask & (rows[None, :] > rows[:, None] - window)[None, None]
    geometry = Geometry("text", prefix=1)
    acc = DistanceAccumulator(geometry, block_elements=40)
    acc(call)
    prof = acc.result()
    probs = reference.attention_probs(call.query, call.key, scale=0.7, mask=call.mask, softcap=5.0)
    valid = call.query_valid
    pos = valid.long().cumsum(-1) - 1
    special = valid & (pos == 0)
    distance = (pos[:, :, None] - pos[:, None, :]).abs()
    mass, spec, mean = naive(probs, distance, valid & ~special, valid & ~special, special, prof.edges.double())
    torch.testing.assert_close(prof.mass[0].double(), mass, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prof.special_mass[0].double(), spec, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prof.mean_distance[0].double(), mean, rtol=1e-5, atol=1e-6)


def _eager_maps(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_attentions=True).attentions


def test_profile_of_a_tiny_vit_equals_its_attention_maps():
    model = tiny_vit(seed=1, attn="eager")
    x = {"pixel_values": torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(4))}
    prof = distance_profile(model, [x], Geometry("image", prefix=1, metric="chebyshev"), block_elements=100)
    coords = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(16, 2)
    coords = torch.cat([torch.zeros(1, 2, dtype=torch.long), coords])
    distance = (coords[:, None] - coords[None]).abs().amax(-1).expand(3, 17, 17)
    special = torch.zeros(3, 17, dtype=torch.bool)
    special[:, 0] = True
    for layer, maps in enumerate(_eager_maps(model, x)):
        mass, spec, mean = naive(maps, distance, ~special, ~special, special, prof.edges.double())
        torch.testing.assert_close(prof.mass[layer].double(), mass, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(prof.special_mass[layer].double(), spec, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(prof.mean_distance[layer].double(), mean, rtol=1e-4, atol=1e-5)


def test_profile_of_tiny_gemma3_with_windows_and_padding_equals_its_attention_maps():
    model = tiny_model("gemma3", attn_implementation="eager")  # layers 0, 2 slide over 5 keys
    ids = torch.randint(3, 64, (2, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    prof = distance_profile(model, [inputs], Geometry("text", prefix=1), block_elements=64)
    valid = mask.bool()
    pos = valid.long().cumsum(-1) - 1
    special = valid & (pos == 0)
    distance = (pos[:, :, None] - pos[:, None, :]).abs()
    for layer, maps in enumerate(_eager_maps(model, inputs)):
        mass, spec, mean = naive(maps, distance, valid & ~special, valid & ~special, special, prof.edges.double())
        torch.testing.assert_close(prof.mass[layer].double(), mass, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(prof.special_mass[layer].double(), spec, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(prof.mean_distance[layer].double(), mean, rtol=1e-4, atol=1e-5)
    assert float(prof.pairs[0, 5:].sum()) == 0 and float(prof.pairs[1, 5:].sum()) > 0  # sliding vs global layer
    trend = prof.layer_trend()
    assert trend["mean"][0] < trend["mean"][1]  # a 5-key window cannot look as far as a global layer


def test_text_edges_and_geometry_errors():
    assert text_edges(40).tolist() == [0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    with pytest.raises(ValueError, match="not a square patch grid; pass grid"):
        Geometry("image", prefix=1).grid_for(21)
    with pytest.raises(ValueError, match="grid \\(3, 3\\) has 9 patches, the input 20"):
        Geometry("image", prefix=1, grid=(3, 3)).grid_for(21)
    with pytest.raises(ValueError, match="kind must be"):
        Geometry("audio")
    acc = DistanceAccumulator(Geometry("text"), edges=torch.tensor([0.0, 2.0, 4.0]))
    with pytest.raises(ValueError, match=r"do not cover 0..8"):
        acc(previous_token_call([9]))
    with pytest.raises(RuntimeError, match="no attention call was observed"):
        DistanceAccumulator(Geometry("text")).result()
