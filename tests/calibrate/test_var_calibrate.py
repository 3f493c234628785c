"""VAR sink-dimension discovery on tiny random Llamas with planted massive activations."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import attnpatch
from attnpatch.calibrate.var import _tau_warnings, calibrate_var, discover_sink_dims, layer_input_ratios
from attnpatch.calibrate.var import capture as var_capture
from attnpatch.integrations.structure import text_decoder_layers
from attnpatch.methods.var import VAR, VARConfig, massive_ratios
from attnpatch.profiles import Profile

from calibration_fixtures import word_tokenizer
from tiny_models import BOS as LLAVA_BOS
from tiny_models import SINK_DIMS as LLAVA_SINK_DIMS
from tiny_models import VOCAB, left_padded_batch, tiny_llava, tiny_model

DIMS = (3, 17)
VALUES = (3.0, 2.4)  # ~150x and ~120x the embedding scale (std 0.02): ratios ~6.2 and ~5.0 of at most sqrt(64) = 8
TAU = 4.0  # the default 20 is above sqrt(hidden_size) = 8 for these models
SINK_ID = 9
BOS = 1


def plant(model: torch.nn.Module, token_ids: tuple[int, ...] = (SINK_ID,), first_position: bool = True):
    """Give `token_ids` (embedding rows) and, with `first_position`, whatever token sits at position 0 (a forward
    hook on the embeddings) massive values on DIMS. Returns the hook handle (or None)."""
    with torch.no_grad():
        for token in token_ids:
            model.model.embed_tokens.weight[token, list(DIMS)] = torch.tensor(VALUES)
    if not first_position:
        return None

    def hook(module, args, out):
        out = out.clone()
        out[:, 0, list(DIMS)] = torch.tensor(VALUES, dtype=out.dtype)
        return out

    return model.model.embed_tokens.register_forward_hook(hook)


def prompts(n: int = 8) -> list[list[int]]:
    """Random token ids in 10..VOCAB-1 with SINK_ID at position 3 + i."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(10, VOCAB, (12 + 2 * i,), generator=g)
        ids[3 + i] = SINK_ID
        rows.append(ids.tolist())
    return rows


@pytest.fixture(scope="module")
def planted():
    model = tiny_model("llama")
    plant(model)
    return model


def test_residual_stream_keeps_planted_activations(planted):
    ids = prompts(1)[0]
    ratios = layer_input_ratios(planted, ids)
    assert sorted(ratios) == [2, 3]
    ordinary = [t for t in range(len(ids)) if t not in (0, 3)]
    for r in ratios.values():
        assert r.shape == (len(ids), 64) and r.dtype == torch.float32
        assert (r[[0, 3]][:, list(DIMS)] > TAU + 0.5).all()
        assert r[ordinary].max() < TAU - 0.5
    only = layer_input_ratios(planted, ids, dims=DIMS, min_layer=3)
    assert sorted(only) == [3] and torch.equal(only[3], ratios[3][:, list(DIMS)])


def test_ratios_exclude_padding():
    model = tiny_model("llama")
    rows = prompts(2)
    ids, mask = left_padded_batch(rows)
    ratios = layer_input_ratios(model, ids, mask)
    alone = layer_input_ratios(model, rows[1])  # the longer row has no padding
    for layer, r in ratios.items():
        assert r.shape == (sum(map(len, rows)), 64)
        torch.testing.assert_close(r[len(rows[0]) :], alone[layer], atol=1e-5, rtol=1e-5)


def test_discovers_planted_dims(planted):
    rows = prompts()
    report = discover_sink_dims(planted, None, rows, tau=TAU)
    assert report.dims == list(DIMS)  # strongest (largest ratio) first
    expected = {f"#{r[0]}@0" for r in rows} | {f"#{SINK_ID}@{3 + i}" for i in range(len(rows))}
    assert set(report.sink_tokens) == expected and report.prompts_with_sinks == len(rows)
    for s in report.dim_stats:
        assert s.layers == [2, 3] and set(s.tokens) == expected and s.consistency == 1.0
        assert s.sink_median > TAU + 0.5 and s.ordinary_p99 < TAU - 0.5 and s.ordinary_max < TAU
        assert s.ordinary_median < 1.5 and s.separation == pytest.approx(s.sink_median / s.ordinary_p99)
    assert report.dim_stats[0].sink_median > report.dim_stats[1].sink_median
    assert report.phi["sink_min"] > TAU and report.phi["ordinary_above_tau"] == 0.0 and report.phi["sink_missed"] == 0
    assert report.phi["ordinary_p99"] < report.suggested_tau < report.phi["sink_median"]
    assert report.warnings == [] and report.prompts == len(rows) and report.hidden_size == 64


def test_text_prompts_with_a_tokenizer():
    model = tiny_model("llama")
    plant(model, token_ids=(BOS, SINK_ID), first_position=False)
    texts = [" ".join(f"t{t}" for t in row) for row in prompts(6)]
    report = discover_sink_dims(model, word_tokenizer(), texts, tau=TAU)
    assert report.dims == list(DIMS)
    assert set(report.sink_tokens) == {"<s>@0"} | {f"t{SINK_ID}@{4 + i}" for i in range(6)}  # BOS shifts by one
    assert report.sink_tokens["<s>@0"] == 6


def test_random_model_has_no_sink_dims():
    model = tiny_model("llama")
    report = discover_sink_dims(model, None, prompts(), tau=TAU)
    assert report.dims == [] and report.dim_stats == [] and report.largest["ratio"] < TAU
    with pytest.raises(ValueError, match="no sink dimension.*largest ratio.*sink_dims"):
        calibrate_var(model, None, prompts(), tau=TAU)


def test_tau_above_the_largest_possible_ratio(planted):
    report = discover_sink_dims(planted, None, prompts(2))  # tau 20 > sqrt(64)
    assert report.dims == [] and report.max_possible_ratio == 8.0
    assert any("sqrt(hidden_size)" in w for w in report.warnings)


def test_separation_warnings(planted):
    assert discover_sink_dims(planted, None, prompts(), tau=TAU).warnings == []
    # at a low tau random tokens with a large entry turn into sinks that the planted dims do not explain
    low = discover_sink_dims(planted, None, prompts(), tau=2.2)
    assert low.dims[:2] == list(DIMS) and any("sink dims miss" in w for w in low.warnings), low.warnings
    assert any("dropped" in w for w in low.warnings)  # dims of the random sinks that ordinary tokens carry too
    phi = dict(sink_min=25.0, sink_median=28.0, sink_missed=0.0, ordinary_p99=21.0, ordinary_max=24.0)
    assert "does not separate" in _tau_warnings(dict(phi, ordinary_above_tau=0.02), 20.0)[0]
    phi.update(ordinary_p99=5.0, ordinary_above_tau=0.001)
    assert "exceed tau 20" in _tau_warnings(phi, 20.0)[0]
    assert _tau_warnings(dict(phi, ordinary_max=19.0, ordinary_above_tau=0.0), 20.0) == []


def test_text_prompts_need_a_tokenizer(planted):
    with pytest.raises(ValueError, match="tokenizer"):
        discover_sink_dims(planted, None, ["some text"], tau=TAU)


def test_profile_saves_and_loads(planted, tmp_path):
    profile = calibrate_var(planted, None, prompts(), tau=TAU)
    assert profile.method == "var" and profile.heads == {}
    assert profile.options == {"sink_dims": list(DIMS), "tau": TAU}
    assert profile.metadata["texts"] == 8 and profile.metadata["seconds"] > 0
    loaded = Profile.load(profile.save(tmp_path / "var"))
    assert loaded.method == "var" and loaded.options == profile.options
    assert loaded.metadata["dims"] == list(DIMS) and loaded.metadata["dim_stats"][0]["dim"] == DIMS[0]
    loaded.check(planted, "var")


def test_calibrate_entry_point(planted):
    profile = attnpatch.calibrate(planted, None, prompts(), method="var", tau=TAU)
    assert profile.options["sink_dims"] == list(DIMS)
    with pytest.raises(ValueError, match="ACT calibration needs tasks"):
        attnpatch.calibrate(planted, None, method="act")


def test_llava_language_model():
    model = tiny_llava()
    rows = [[LLAVA_BOS, *row] for row in prompts(4)]
    report = discover_sink_dims(model, None, rows)  # default tau 20: hidden 1024 leaves room above it
    assert sorted(report.dims) == sorted(LLAVA_SINK_DIMS) and set(report.sink_tokens) == {f"#{LLAVA_BOS}@0"}
    assert report.num_layers == 5 and report.warnings == []
    assert attnpatch.calibrate(model, None, rows, method="var").options["sink_dims"] == report.dims


def test_calibration_measures_the_ratio_the_method_thresholds():
    """One statistic (`massive_ratios`): on the planted LLaVA, phi measured by calibration on its dims equals the
    method's score, and VAR's sink selection is exactly the tokens whose measured phi passes the calibrated tau."""
    assert var_capture.massive_ratios is massive_ratios
    model = tiny_llava()
    rows = [[LLAVA_BOS, *row] for row in prompts(3)]
    profile = calibrate_var(model, None, rows)
    dims, tau = profile.options["sink_dims"], profile.options["tau"]
    num_layers = len(text_decoder_layers(model))
    method = VAR(VARConfig(sink_dims=dims, tau=tau), num_layers, [1] * num_layers)
    prompt = SimpleNamespace(past_length=0, attention_mask=None, state=method.new_state())
    for ids in rows:
        hidden = var_capture.capture_layer_inputs(model, ids, None, lambda layer, x: x.clone())
        measured = layer_input_ratios(model, ids, dims=dims)
        assert sorted(measured) == sorted(hidden) == list(range(2, num_layers))
        for layer, x in hidden.items():
            phi = measured[layer].amax(-1)
            assert torch.equal(phi, massive_ratios(x, dims).amax(-1).cpu())
            method.observe_layer_input(layer, x[None], prompt)
            assert torch.equal(prompt.state.sinks[layer][0].cpu(), phi > tau)
            assert (phi > tau).nonzero().flatten().tolist() == [0]  # the planted BOS
