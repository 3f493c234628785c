"""lm-eval's multiple-choice metrics (acc, acc_norm) and the multiple-testing corrections."""

from __future__ import annotations

import numpy as np
import pytest

from attnpatch.eval.metrics import METRICS, check_metrics, continuation_length, pick
from attnpatch.eval.scoring import choose
from attnpatch.eval.stats import benjamini_hochberg, holm


def test_continuation_length_drops_only_the_delimiter():
    assert continuation_length(" cellular telephone") == len("cellular telephone")
    assert continuation_length("no") == 2
    assert continuation_length("  the sun rose") == len(" the sun rose")  # lm-eval's COPA choice keeps its own space
    assert continuation_length(" ") == 1  # never divides by zero


def test_acc_and_acc_norm_pick_as_lm_eval():
    # lm-eval: pred = argmax(lls), pred_norm = argmax(lls / [len(choice) for choice in choices])
    options, choices = [" ab", " abcdefgh"], ["ab", "abcdefgh"]
    lls = [-3.0, -8.0]  # per character: -1.5 vs -1.0
    assert pick(lls, options, "acc") == int(np.argmax(lls)) == 0
    assert pick(lls, options, "acc_norm") == int(np.argmax(np.array(lls) / [len(c) for c in choices])) == 1
    # the leading space matters: -2/2 = -1.0 < -6.3/7 = -0.9 (lm-eval picks 1); counting it, -2/3 > -6.3/8 (0)
    lls = [-2.0, -6.3]
    options, choices = [" ab", " abcdefg"], ["ab", "abcdefg"]
    assert pick(lls, options, "acc_norm") == int(np.argmax(np.array(lls) / [len(c) for c in choices])) == 1
    assert int(np.argmax(np.array(lls) / [len(o) for o in options])) == 0
    assert choose(lls, options, [1, 1], "chars") == 1 and choose(lls, options, [1, 1], "none") == 0
    # ties: the first option, as np.argmax
    assert pick([-1.0, -1.0], [" a", " b"], "acc") == 0 and pick([-2.0, -1.0], [" ab", " b"], "acc_norm") == 0
    with pytest.raises(ValueError, match="unknown metric"):
        pick(lls, options, "f1")


def test_check_metrics():
    assert check_metrics(["acc_norm"]) == ("acc_norm",) and check_metrics(METRICS) == ("acc", "acc_norm")
    for bad in ([], ["acc", "bytes"]):
        with pytest.raises(ValueError, match="unknown metric"):
            check_metrics(bad)


def test_holm_and_bh():
    p = [0.01, 0.04, 0.03, 0.005, 0.5]
    # Holm: sorted 0.005*5, 0.01*4, 0.03*3, 0.04*2 -> running max, 0.5*1
    assert holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.5])
    # BH: p * m / rank, then the running minimum from the largest
    assert benjamini_hochberg(p) == pytest.approx([0.025, 0.05, 0.05, 0.025, 0.5])
    assert holm([0.9, 0.8]) == [1.0, 1.0] and holm([0.2]) == [0.2]
    rng = np.random.default_rng(0)
    q = rng.random(30) ** 3
    assert all(h >= b - 1e-15 for h, b in zip(holm(q), benjamini_hochberg(q), strict=True))
    try:
        from scipy.stats import false_discovery_control
    except ImportError:
        return
    np.testing.assert_allclose(benjamini_hochberg(q), false_discovery_control(q), rtol=1e-12)
