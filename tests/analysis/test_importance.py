"""Head importance by pruning: a planted decisive head ranks first on every metric, the batched path (a different
head per batch copy) equals one head per forward, the Taylor score equals finite differences, next-token scoring."""

from __future__ import annotations

import pytest
import torch

from attnpatch.analysis import head_importance
from attnpatch.analysis.head_importance import METRICS

from analysis_fixtures import DECISIVE, decisive_vit, tiny_vit
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def planted():
    model = decisive_vit()
    x = torch.randn(48, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        labels = model(pixel_values=x).logits.argmax(-1)
    return model, [{"pixel_values": x[:24], "labels": labels[:24]}, {"pixel_values": x[24:], "labels": labels[24:]}]


def test_planted_decisive_head_is_the_most_important_on_every_metric(planted):
    model, batches = planted
    imp = head_importance(model, batches)
    assert imp.baseline_accuracy == 1.0 and imp.items == imp.examples == 48
    assert imp.accuracy_drop.shape == (2, 4)
    for metric in METRICS:
        values = imp.metric(metric)
        top = imp.ranking(metric)[0]
        assert (top["layer"], top["head"]) == DECISIVE, metric
        others = values.clone()
        others[DECISIVE] = float("-inf")
        assert values[DECISIVE] > 3 * others.max().clamp_min(1e-6), (metric, values)
    assert imp.flip_rate[DECISIVE] == imp.accuracy_drop[DECISIVE]  # labels are the unmasked predictions


def test_several_heads_per_forward_equal_one_head_per_forward(planted):
    model, batches = planted
    batched = head_importance(model, batches, max_batch=96, taylor=False)  # 4 heads per forward
    single = head_importance(model, batches, heads_per_forward=1, taylor=False)  # [H] gates, one head each
    for metric in ("accuracy_drop", "flip_rate"):
        assert torch.equal(batched.metric(metric), single.metric(metric))
    torch.testing.assert_close(batched.prob_drop, single.prob_drop, rtol=0, atol=1e-6)
    assert batched.taylor is None


def test_taylor_score_equals_finite_differences():
    """taylor[l, h] = mean over examples of |d loss_x / d gate| (loss_x: cross-entropy), taylor_sum[l, h] =
    |mean over examples of d loss_x / d gate|, checked in float64."""
    import attnpatch

    model = tiny_vit(seed=3).double()
    x = torch.randn(3, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1])
    batches = [{"pixel_values": x[i : i + 1], "labels": labels[i : i + 1]} for i in range(3)]
    imp = head_importance(model, batches)
    assert bool((imp.taylor_sum < imp.taylor - 1e-9).any())  # the examples' gradients differ in sign somewhere
    eps = 1e-5
    for layer, head in [(0, 0), (0, 2), (1, 1), (1, 3)]:
        total = signed = 0.0
        for i in range(3):
            losses = []
            for sign in (1, -1):
                gate = torch.ones(4, dtype=torch.float64)
                gate[head] += sign * eps
                with torch.no_grad(), attnpatch.patched(model, "head_mask", gates={layer: gate}):
                    out = model(pixel_values=x[i : i + 1]).logits
                losses.append(float(torch.nn.functional.cross_entropy(out, labels[i : i + 1])))
            total += abs(losses[0] - losses[1]) / (2 * eps)
            signed += (losses[0] - losses[1]) / (2 * eps)
        assert float(imp.taylor[layer, head]) == pytest.approx(total / 3, rel=1e-5)
        assert float(imp.taylor_sum[layer, head]) == pytest.approx(abs(signed) / 3, rel=1e-5)


def test_next_token_importance_scores_the_last_positions_and_selected_heads():
    model = tiny_model("gemma3")  # sliding-window and global layers, GQA
    ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding: predictions made at, or of, pad positions are not scored
    batches = [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}]
    imp = head_importance(model, batches, task="next-token", score_last=10, heads={1: [0, 3], 3: [2]})
    assert imp.task == "next-token" and imp.examples == 4
    assert imp.items == 4 * 10 - 2  # row 0: the predictions at pad positions 1 and 2
    assert 0 < imp.baseline_prob < 1
    evaluated = torch.zeros(4, 4, dtype=torch.bool)
    evaluated[1, [0, 3]] = evaluated[3, 2] = True
    for metric in ("prob_drop", "taylor"):
        values = imp.metric(metric)
        assert bool((values[~evaluated] == 0).all()) and bool((values[evaluated] != 0).all()), metric
    assert {(r["layer"], r["head"]) for r in imp.ranking("taylor", top=3)} == {(1, 0), (1, 3), (3, 2)}


def test_bad_inputs_are_refused(planted):
    model, batches = planted
    with pytest.raises(ValueError, match="labels"):
        head_importance(model, [{"pixel_values": batches[0]["pixel_values"]}])
    with pytest.raises(ValueError, match="labels range 0..3 but the model scores 3 classes"):
        head_importance(model, [{"pixel_values": batches[0]["pixel_values"][:2], "labels": torch.tensor([0, 3])}])
    with pytest.raises(ValueError, match="task must be one of"):
        head_importance(model, batches, task="regression")
    with pytest.raises(ValueError, match=r"heads\[1\]: head 7 is out of range"):
        head_importance(model, batches, heads={1: [7]})
    with pytest.raises(ValueError, match="data is empty"):
        head_importance(model, [])
    with pytest.raises(ValueError, match="uncomputed metric 'taylor'"):
        head_importance(model, batches[:1], taylor=False, heads={0: [0]}).ranking("taylor")
    model.train()
    try:
        with pytest.raises(RuntimeError, match=r"model.eval\(\)"):
            head_importance(model, batches)
    finally:
        model.eval()
