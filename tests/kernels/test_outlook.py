"""VOLO outlook attention: the fused op (Triton in the CPU interpreter here, on the GPU in the `gpu` tests; the PyTorch
path) against timm's operator in float64, and `attnpatch.apply(volo, "outlook")` on random-initialised timm VOLOs.

Tolerance rule of the field: error vs the float64 oracle at most twice the error of the same math done in PyTorch at
the input dtype (timm's own unfold/softmax/fold lines, `reference.outlook(..., dtype=...)`) plus 1e-5.
"""

from __future__ import annotations

import copy

import pytest
import torch
from timm.models.volo import VOLO, OutlookAttention
from torch import nn

import attnpatch
import attnpatch.nn
from attnpatch import UnsupportedModelError
from attnpatch.kernels import backend, outlook, reference
from attnpatch.kernels.outlook import outlook_attention

from devices import TRITON_DEVICE
from tiny_models import sharpen, tiny_volo

CASES = {
    # name: (B, H, W, heads, head_dim, K, padding, stride)
    "k3-s2-odd": (2, 7, 9, 2, 8, 3, 1, 2),  # VOLO's geometry: 1, 2 or 4 windows per pixel, partial windows at the edge
    "k3-s1": (1, 6, 5, 3, 4, 3, 1, 1),  # up to 9 windows per pixel
    "k3-s3": (1, 7, 6, 2, 8, 3, 1, 3),  # windows that do not overlap
    "k5-s3-p2": (1, 9, 8, 1, 16, 5, 2, 3),
    "k2-s2-p0": (1, 6, 8, 2, 8, 2, 0, 2),
    "head-dim-80": (1, 5, 5, 1, 80, 3, 1, 2),  # two channel blocks in the kernels
}


def make_inputs(
    case: str, dtype: torch.dtype, *, strided: bool = False, seed: int = 0, device: torch.device | str = "cpu"
):
    """(logits, v, geometry kwargs) on `device` (drawn on the CPU: the same values everywhere); `strided`:
    non-contiguous views, as a caller may hand them over."""
    b, h, w, heads, head_dim, k, pad, stride = CASES[case]
    gh, gw = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    g = torch.Generator().manual_seed(seed)
    if strided:
        logits = torch.randn(b, gw, gh, heads * k**4, generator=g).to(device).transpose(1, 2)
        v = torch.randn(b, h, w, 2 * heads * head_dim, generator=g).to(device)[..., ::2]
    else:
        logits = torch.randn(b, gh, gw, heads * k**4, generator=g).to(device)
        v = torch.randn(b, h, w, heads * head_dim, generator=g).to(device)
    geo = dict(kernel_size=k, padding=pad, stride=stride, scale=head_dim**-0.5)
    return (2 * logits).to(dtype), v.to(dtype), geo


def run(fn, logits, v, grad_out, geo, check_out: bool = False):
    """(out, d_logits, d_v) as float64; `check_out`: also check out's dtype, shape and layout."""
    lg = logits.detach().clone().requires_grad_()
    vv = v.detach().clone().requires_grad_()
    out = fn(lg, vv, **geo)
    if check_out:
        assert out.dtype == v.dtype and out.shape == v.shape and out.is_contiguous()
    out.backward(grad_out.to(out.dtype))
    return out.detach().double(), lg.grad.double(), vv.grad.double()


def check_against_oracle(fn, logits, v, geo):
    grad_out = torch.randn(v.shape, generator=torch.Generator().manual_seed(7)).to(v.device)
    got = run(fn, logits, v, grad_out, geo, check_out=True)
    ref = run(reference.outlook, logits.double(), v.double(), grad_out.double(), geo)
    base = run(lambda a, b, **kw: reference.outlook(a, b, dtype=v.dtype, **kw), logits, v, grad_out, geo)
    for name, x, r, lo in zip(("out", "d_logits", "d_v"), got, ref, base, strict=True):
        bound = 2 * (lo - r).abs().max().item() + 1e-5
        err = (x - r).abs().max().item()
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


@pytest.fixture
def triton_backend(monkeypatch):
    if backend.triton_version() is None:
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available() and not backend.interpreting():
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    return TRITON_DEVICE  # the device whose tensors the Triton path gets


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "torch")


# --------------------------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize(
    ("case", "dtype"),
    [pytest.param(case, torch.float32, id=f"{case}-fp32") for case in CASES]
    + [pytest.param(case, torch.float16, id=f"{case}-fp16") for case in ("k3-s2-odd", "k2-s2-p0", "head-dim-80")],
)
def test_triton_matches_oracle(triton_backend, case, dtype):
    logits, v, geo = make_inputs(case, dtype, strided=True, device=triton_backend)
    check_against_oracle(outlook_attention, logits, v, geo)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["k3-s2-odd", "k3-s1", "k5-s3-p2", "k2-s2-p0"])
def test_torch_path_matches_oracle(torch_backend, case, dtype):
    logits, v, geo = make_inputs(case, dtype, strided=case == "k3-s2-odd")
    check_against_oracle(outlook_attention, logits, v, geo)


def test_torch_path_chunks_the_batch(torch_backend, monkeypatch):
    monkeypatch.setattr(outlook, "CHUNK_ELEMENTS", 1)  # one batch element per chunk
    logits, v, geo = make_inputs("k3-s2-odd", torch.float32)
    logits, v = logits.repeat(2, 1, 1, 1)[:3], torch.cat([v, -v])[:3]
    assert len(outlook._chunks(v, outlook.geometry(logits, v, 3, 1, 2))) == 3
    check_against_oracle(outlook_attention, logits, v, geo)


@pytest.mark.parametrize("case", [(1, 5, 4, 1, 2, 3, 1, 2), (2, 3, 4, 2, 1, 2, 1, 1)])
def test_torch_path_gradcheck(torch_backend, case):
    b, h, w, heads, head_dim, k, pad, stride = case
    gh, gw = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(b, gh, gw, heads * k**4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, w, heads * head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: outlook_attention(a, c, k, pad, stride, 0.7), (logits, v))


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_gradient_of_one_input(path, monkeypatch):
    if path == "triton" and not (torch.cuda.is_available() or backend.interpreting()):
        pytest.skip("no CUDA and TRITON_INTERPRET is not set")
    monkeypatch.setenv(backend.ENV_VAR, path)
    device = TRITON_DEVICE if path == "triton" else torch.device("cpu")
    logits, v, geo = make_inputs("k3-s2-odd", torch.float32, device=device)
    ref_v = v.double().requires_grad_()
    reference.outlook(logits.double(), ref_v, **geo).sum().backward()
    v = v.requires_grad_()
    outlook_attention(logits, v, **geo).sum().backward()
    assert logits.grad is None
    assert (v.grad.double() - ref_v.grad).abs().max().item() <= 1e-5


def test_forced_triton_refuses_what_it_cannot_run(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    logits, v, geo = make_inputs("k3-s2-odd", torch.float64, device=TRITON_DEVICE)
    with pytest.raises(backend.BackendError, match="float64"):
        outlook_attention(logits, v, **geo)
    logits, v, geo = make_inputs("k3-s2-odd", torch.float32, device=TRITON_DEVICE)
    with pytest.raises(backend.BackendError, match="dropout"):
        outlook_attention(logits, v, dropout_p=0.1, **geo)


@pytest.mark.parametrize(
    ("v_shape", "logits_shape", "geo", "message"),
    [
        ((1, 5, 5, 8), (1, 3, 3, 80), (3, 1, 2), "heads \\* K\\^4"),
        ((1, 5, 5, 6), (1, 3, 3, 4 * 81), (3, 1, 2), "do not split"),
        ((1, 7, 7, 8), (1, 4, 4, 2 * 16), (2, 0, 2), "3x3 grid"),  # timm's pool grid (4x4) is not the unfold grid
        ((1, 5, 5, 8), (2, 3, 3, 2 * 81), (3, 1, 2), "batch 1"),
        ((5, 5, 8), (1, 3, 3, 2 * 81), (3, 1, 2), "expects v"),
        ((1, 5, 5, 8), (1, 3, 3, 2 * 81), (0, 1, 2), "kernel_size"),
        ((1, 5, 5, 8), (1, 3, 3, 2 * 81), (3, 1, 0), "stride"),
    ],
)
def test_bad_shapes_are_named(v_shape, logits_shape, geo, message):
    with pytest.raises(ValueError, match=message):
        outlook_attention(torch.randn(logits_shape), torch.randn(v_shape), *geo, 1.0)


# ------------------------------------------------------------------------------------------------- timm modules


def count_unfolds(model: nn.Module) -> list[int]:
    """A list that grows by one for each call of a timm OutlookAttention's own unfold (the unfused path)."""
    calls: list[int] = []
    for module in model.modules():
        if isinstance(module, OutlookAttention):
            module.unfold.register_forward_hook(lambda *_: calls.append(1))
    return calls


def outlook_modules(model: nn.Module) -> list[OutlookAttention]:
    return [m for m in model.modules() if isinstance(m, OutlookAttention)]


def assert_untouched(model: nn.Module) -> None:
    assert attnpatch.get_patch(model) is None
    assert all("forward" not in m.__dict__ and "_attnpatch_binding" not in m.__dict__ for m in model.modules())


def test_patched_volo_matches_and_remove_restores(torch_backend):
    model = tiny_volo().eval()
    other = tiny_volo().eval()  # same class, not patched
    x = torch.randn(2, 3, 88, 88)
    calls = count_unfolds(model)
    other_calls = count_unfolds(other)
    class_forward = OutlookAttention.forward
    with torch.no_grad():
        before = model(x)
        assert len(calls) == 3
        keys = list(model.state_dict())
        patch = attnpatch.apply(model, "outlook")
        assert patch.integration.num_layers == 3 and patch.integration.num_heads == [2, 2, 4]
        assert list(model.state_dict()) == keys  # nothing of the patch in the state_dict
        patched = model(x)
        assert len(calls) == 3  # the fused op ran, not timm's unfold
        other(x)
        assert len(other_calls) == 3 and all("forward" not in m.__dict__ for m in other.modules())
        assert OutlookAttention.forward is class_forward
        assert (patched - before).abs().max().item() <= 1e-5
        patch.remove()
        after = model(x)
    assert torch.equal(after, before)
    assert len(calls) == 6
    assert_untouched(model)


def test_deep_copy_of_a_patched_model_runs_its_own_modules(torch_backend):
    model = tiny_volo().eval()
    x = torch.randn(1, 3, 88, 88)
    with torch.no_grad():
        before = model(x)
        patch = attnpatch.apply(model, "outlook")
        twin = copy.deepcopy(model)
        for module in outlook_modules(model):
            module.v.weight.zero_()  # the original changes; the copy must not follow
        assert (twin(x) - before).abs().max().item() <= 1e-5
        assert (model(x) - before).abs().max().item() > 1e-3
        twin_patch = attnpatch.get_patch(twin)
        assert twin_patch is not patch and twin_patch.model is twin
        twin_patch.remove()
        assert torch.equal(twin(x), before)
    assert_untouched(twin)
    patch.remove()


def test_patched_volo_training_gradients_match(torch_backend):
    x = torch.randn(2, 3, 88, 88, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 10, generator=torch.Generator().manual_seed(2))

    def grads(model):
        model.zero_grad()
        (model(x) * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = tiny_volo().train()
    expected = grads(model)
    with attnpatch.patched(model, "outlook"):
        got = grads(model)
    assert got.keys() == expected.keys() and any(".attn.attn." in n for n in got)
    for name, g in got.items():
        scale = expected[name].abs().max().item()
        assert (g - expected[name]).abs().max().item() <= 1e-5 * max(1.0, scale), name


def test_patched_volo_under_autocast(torch_backend):
    model = tiny_volo().eval()
    x = torch.randn(2, 3, 88, 88, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference_fp32 = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            unpatched = model(x)
            with attnpatch.patched(model, "outlook"):
                patched = model(x)
    assert patched.dtype == unpatched.dtype
    spread = (unpatched.float() - reference_fp32).abs().max().item()
    assert 0 < spread and (patched.float() - reference_fp32).abs().max().item() <= 2 * spread + 1e-5


def test_patched_volo_on_triton(triton_backend):
    torch.manual_seed(0)
    model = sharpen(
        VOLO(
            layers=(1, 1, 1, 1), img_size=72, embed_dims=(16, 32, 32, 32), num_heads=(2, 2, 2, 2), stem_hidden_dim=8,
            num_classes=5,
        )
    ).to(triton_backend)  # fmt: skip
    x = torch.randn(1, 3, 72, 72).to(triton_backend)  # a 9x9 stage-1 grid
    expected = model(x)
    expected.sum().backward()
    expected_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with attnpatch.patched(model, "outlook"):
        out = model(x)
        out.sum().backward()
    assert (out - expected).abs().max().item() <= 1e-5
    for name, p in model.named_parameters():
        assert (p.grad - expected_grad[name]).abs().max().item() <= 1e-5 * max(1.0, p.grad.abs().max().item()), name


def test_real_volo_d1(torch_backend):
    import timm

    model = sharpen(timm.create_model("volo_d1_224", pretrained=False).eval(), 40.0)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    calls = count_unfolds(model)
    with torch.no_grad():
        before = model(x)
        with attnpatch.patched(model, "outlook") as patch:
            assert patch.integration.num_layers == 4
            patched = model(x)
        after = model(x)
    assert len(calls) == 8  # four modules, unfused twice, fused once
    assert (patched - before).abs().max().item() <= 1e-5
    assert torch.equal(after, before)


def test_module_is_interchangeable_with_timm():
    kw = dict(kernel_size=3, padding=1, stride=2, qkv_bias=True, attn_drop=0.3)
    torch.manual_seed(0)
    ours = attnpatch.nn.OutlookAttention(32, 4, **kw)
    theirs = OutlookAttention(32, 4, **kw)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 9, 32)
    ours.eval()
    theirs.eval()
    assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5
    ours.train()  # attention dropout: the same masks from the same seed
    theirs.train()
    torch.manual_seed(3)
    a = ours(x)
    torch.manual_seed(3)
    b = theirs(x)
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - ours.eval()(x)).abs().max().item() > 1e-2  # dropout did act
    ours.load_state_dict(OutlookAttention(32, 4, **kw).state_dict())  # strict, the other way round


# -------------------------------------------------------------------------------------------------- bad input


def test_model_without_outlook_attention_is_refused():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(UnsupportedModelError, match="has no timm.models.volo.OutlookAttention"):
        attnpatch.apply(model, "outlook")
    assert_untouched(model)


class ScaledOutlook(OutlookAttention):
    def forward(self, x: torch.Tensor, gain: float = 2.0) -> torch.Tensor:
        return super().forward(x) * gain


def test_module_with_another_forward_is_refused_and_nothing_is_patched():
    torch.manual_seed(0)
    model = nn.Sequential(OutlookAttention(16, 2, stride=2), ScaledOutlook(16, 2, stride=2))
    x = torch.randn(1, 5, 7, 16)
    before = model(x)
    with pytest.raises(UnsupportedModelError, match="ScaledOutlook overrides OutlookAttention.forward"):
        attnpatch.apply(model, "outlook")
    assert_untouched(model)
    assert torch.equal(model(x), before)


def test_changed_parts_are_refused():
    model = nn.Sequential(OutlookAttention(16, 2, stride=2), OutlookAttention(16, 2, stride=2))
    model[1].pool = nn.AvgPool2d(2, 2)  # floor mode: not the pooling the fused forward assumes
    with pytest.raises(UnsupportedModelError, match="ceil_mode=True"):
        attnpatch.apply(model, "outlook")
    assert_untouched(model)


def test_instance_forward_replaced_elsewhere_is_refused():
    model = nn.Sequential(OutlookAttention(16, 2, stride=2), OutlookAttention(16, 2, stride=2))
    model[1].forward = model[1].forward  # e.g. another tool's wrapper
    with pytest.raises(UnsupportedModelError, match="already replaced"):
        attnpatch.apply(model, "outlook")
    assert attnpatch.get_patch(model) is None and "forward" not in model[0].__dict__


def test_unknown_option_and_double_apply_are_refused():
    model = nn.Sequential(OutlookAttention(16, 2, stride=2))
    with pytest.raises(ValueError, match="unknown option"):
        attnpatch.apply(model, "outlook", beta=0.5)
    assert_untouched(model)
    with attnpatch.patched(model, "outlook"):
        with pytest.raises(RuntimeError, match="already patched"):
            attnpatch.apply(model, "outlook")
    assert_untouched(model)


def test_unsupported_input_shape_is_named(torch_backend):
    model = nn.Sequential(OutlookAttention(16, 2, kernel_size=2, padding=0, stride=2))
    x = torch.randn(1, 5, 5, 16)  # timm pools to 3x3 but unfolds 2x2 windows
    with pytest.raises(RuntimeError):  # timm's own forward fails too (a reshape error)
        model(x)
    with attnpatch.patched(model, "outlook"):
        with pytest.raises(ValueError, match="2x2 grid of windows on a 5x5 image"):
            model(x)
        with pytest.raises(ValueError, match=r"expects x \[B, H, W, C\]"):
            model(torch.randn(5, 5, 16))
    assert_untouched(model)


# ---------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_volo_d1_stage1_shape(monkeypatch, dtype):
    """Triton at VOLO-D1 stage-1 size against our PyTorch path on fp32 copies, bound by timm's math at `dtype`."""
    g = torch.Generator(device="cuda").manual_seed(0)
    b, hw, c, heads = 8, 28, 192, 6
    logits = (2 * (c // heads) ** 0.5 * torch.randn(b, 14, 14, heads * 81, device="cuda", generator=g)).to(dtype)
    v = torch.randn(b, hw, hw, c, device="cuda", generator=g).to(dtype)
    grad_out = torch.randn(b, hw, hw, c, device="cuda", generator=g)
    geo = dict(kernel_size=3, padding=1, stride=2, scale=(c // heads) ** -0.5)
    monkeypatch.setenv(backend.ENV_VAR, "triton")
    got = run(outlook_attention, logits, v, grad_out, geo)
    monkeypatch.setenv(backend.ENV_VAR, "torch")
    ref = run(outlook_attention, logits.float(), v.float(), grad_out, geo)
    base = run(lambda a, x, **kw: reference.outlook(a, x, dtype=dtype, **kw), logits, v, grad_out, geo)
    for name, x, r, lo in zip(("out", "d_logits", "d_v"), got, ref, base, strict=True):
        bound = 2 * (lo - r).abs().max().item() + 1e-5
        assert (x - r).abs().max().item() <= bound, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_volo_d1_patched():
    import timm

    model = timm.create_model("volo_d1_224", pretrained=False).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        before = model(x)
        with attnpatch.patched(model, "outlook"):
            patched = model(x)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                patched_bf16 = model(x).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            before_bf16 = model(x).float()
    assert (patched - before).abs().max().item() <= 1e-4 * max(1.0, before.abs().max().item())
    spread = (before_bf16 - before).abs().max().item()
    assert (patched_bf16 - before).abs().max().item() <= 2 * spread + 1e-2
