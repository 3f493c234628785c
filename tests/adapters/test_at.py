"""The `adapter` method (perturbations, gradient leaves, probes) and attention AT/iAT: identity at zero perturbation,
the perturbation gradient against finite differences, the training step against a hand-written reference, the
paper's iAT direction against a materialised one, save/load/detach, Trainer + LoRA, and clear errors."""

from __future__ import annotations

import pytest
import torch

import attnpatch
from attnpatch.adapters import AttentionAT, AttentionATConfig
from attnpatch.adapters.adversarial import iat_direction, normalize_perturbation

from tiny_models import tiny_model


def bert(dtype=torch.float64):
    return tiny_model("bert", attn_implementation="sdpa").to(dtype)


def padded_batch():
    ids = torch.randint(3, 64, (3, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    mask[2, 4:] = 0
    return ids, mask


def task_loss(model, ids, mask):
    """A scalar depending on every visible token: a fixed random readout of the hidden states."""
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    readout = torch.linspace(-1, 1, hidden.shape[-1], dtype=hidden.dtype)
    per_token = torch.sin(hidden @ readout) * mask
    return (per_token.sum(1) / mask.sum(1)).pow(2).mean()


def test_zero_perturbation_is_identity_and_detach_restores_bits():
    model = bert(torch.float32)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    at = AttentionAT(model, layers=[1, 2])
    with at.method.perturbed({1: torch.zeros(1, 1, 7, 7)}), torch.no_grad():
        patched = model(input_ids=ids, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    assert torch.allclose(patched[valid], before[valid], atol=1e-5)
    at.detach()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, before)


@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])  # GQA; sliding windows (gemma3, mistral)
def test_causal_lm_zero_perturbation_matches_unpatched(family):
    model = tiny_model(family)
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        zeros = {layer: torch.zeros(2, 4, 9, 9) for layer in range(4)}
        with attnpatch.patched(model, "adapter") as patch, patch.method.perturbed(zeros):
            after = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    assert torch.allclose(after[valid], before[valid], atol=1e-5)


def test_perturbation_gradient_matches_finite_differences():
    model = bert()
    ids, mask = padded_batch()
    with attnpatch.patched(model, "adapter", layers=[0, 2]) as patch:
        with patch.method.perturbation_leaves() as leaves:
            loss = task_loss(model, ids, mask)
        grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
        assert set(grads) == {0, 2} and grads[0].shape == (3, 4, 7, 7)
        assert torch.all(grads[2][1, :, :, 5:] == 0) and torch.all(grads[2][2, :, :, 4:] == 0)  # hidden keys
        eps = 1e-6
        for layer, b, h, i, j in [(0, 0, 1, 2, 3), (2, 1, 3, 0, 4), (2, 2, 0, 3, 1), (0, 2, 2, 1, 0)]:
            bump = torch.zeros(3, 4, 7, 7, dtype=torch.float64)
            bump[b, h, i, j] = eps
            with torch.no_grad():
                with patch.method.perturbed({layer: bump}):
                    up = task_loss(model, ids, mask)
                with patch.method.perturbed({layer: -bump}):
                    down = task_loss(model, ids, mask)
            numeric = (up - down) / (2 * eps)
            assert abs(numeric - grads[layer][b, h, i, j]) < 1e-7 + 1e-5 * abs(numeric), (layer, b, h, i, j)
            assert abs(grads[layer][b, h, i, j]) > 1e-8  # a real, non-zero entry was checked


def reference_step(model, ids, mask, *, xi, lam, norm, mode="at"):
    """The AT step written out by hand: gradient leaves -> direction -> adversarial forward -> total."""
    with attnpatch.patched(model, "adapter") as patch:
        method = patch.method
        with method.recording_logits() as clean_logits:
            clean = task_loss(model, ids, mask)
        with method.perturbation_leaves() as leaves:
            first = task_loss(model, ids, mask)
        grads = dict(zip(leaves, torch.autograd.grad(first, list(leaves.values())), strict=True))
        if mode == "iat_code":
            grads = {k: -g for k, g in grads.items()}
        elif mode == "iat":
            grads = iat_direction(grads, clean_logits)
        if norm == "row":
            direction = {k: g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12) for k, g in grads.items()}
        else:
            total = torch.sqrt(sum(g.pow(2).sum(dim=(1, 2, 3)) for g in grads.values()))
            direction = {k: g / total.view(-1, 1, 1, 1) for k, g in grads.items()}
        with method.perturbed({k: xi * d for k, d in direction.items()}):
            adv = task_loss(model, ids, mask)
        loss = clean + lam * adv
        params = [p for p in model.parameters() if p.requires_grad]
        return loss.detach(), torch.autograd.grad(loss, params, retain_graph=True), torch.autograd.grad(clean, params)


@pytest.mark.parametrize(("mode", "norm", "match"), [("at", "row", False), ("at", "example", False),
                                                     ("iat", "row", False), ("iat", "example", True)])  # fmt: skip
def test_training_step_matches_hand_written_reference(mode, norm, match):
    model = bert()
    ids, mask = padded_batch()
    ref_mode = "iat_code" if (mode == "iat" and match) else mode
    ref_loss, ref_grads, clean_grads = reference_step(model, ids, mask, xi=0.7, lam=0.5, norm=norm, mode=ref_mode)
    at = AttentionAT(model, mode=mode, xi=0.7, lam=0.5, norm=norm, match_released_code=match)
    model.zero_grad()
    result = at.loss(lambda: task_loss(model, ids, mask))
    assert torch.allclose(result.total.detach(), ref_loss, rtol=1e-10)
    result.total.backward()
    extra = clean_grads if match else [torch.zeros_like(g) for g in clean_grads]  # the released code's leak
    params = [p for p in model.parameters() if p.requires_grad]
    for p, ref, leak in zip(params, ref_grads, extra, strict=True):
        assert torch.allclose(p.grad, ref + leak, rtol=1e-8, atol=1e-12)
    at.detach()


def test_perturbation_changes_the_loss_upwards():
    """xi * normalize(grad) is an ascent direction: the adversarial loss exceeds the clean one for a small xi."""
    model = bert()
    ids, mask = padded_batch()
    at = AttentionAT(model, xi=0.05)
    result = at.loss(lambda: task_loss(model, ids, mask))
    assert result.adversarial > result.clean
    at.detach()


def test_iat_direction_matches_materialised_differences():
    gen = torch.Generator().manual_seed(0)
    b, h, n = 4, 2, 5
    logits = {0: torch.randn(b, h, n, n, generator=gen, dtype=torch.float64)}
    visible = torch.ones(b, 1, n, n, dtype=torch.bool)
    visible[2, :, :, 3:] = False
    grads = {0: torch.randn(b, h, n, n, generator=gen, dtype=torch.float64) * visible}
    out = iat_direction(grads, {0: (logits[0], visible)})[0]
    for i in range(b):
        dirs, coef = [], []
        for j in range(b):
            both = (visible[i] & visible[j]).double()
            diff = (logits[0][j] - logits[0][i]) * both
            d = diff / diff.norm() if diff.norm() > 0 else diff
            dirs.append(d)
            coef.append((grads[0][i] * d).sum())
        w = torch.stack(coef) / torch.stack(coef).norm()
        expected = sum(wj * dj for wj, dj in zip(w, dirs, strict=True))
        assert torch.allclose(out[i].double(), expected, atol=1e-6)
    assert torch.all(out[2][:, :, 3:] == 0)  # restricted to keys example 2 sees


def test_normalisations():
    gen = torch.Generator().manual_seed(1)
    grads = {0: torch.randn(2, 3, 4, 5, generator=gen), 3: torch.randn(2, 3, 4, 5, generator=gen)}
    rows = normalize_perturbation(grads, "row")
    assert torch.allclose(rows[3].norm(dim=-1), torch.ones(2, 3, 4))
    ex = normalize_perturbation(grads, "example")
    total = ex[0].pow(2).sum(dim=(1, 2, 3)) + ex[3].pow(2).sum(dim=(1, 2, 3))
    assert torch.allclose(total, torch.ones(2))


def test_probe_is_the_attention_row_and_differentiable():
    model = tiny_model("bert", attn_implementation="eager")
    ids, mask = padded_batch()
    with torch.no_grad():
        maps = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    with attnpatch.patched(model, "adapter", layers=[1, 3]) as patch:
        patch.method.add_probe("cls", layer=3, head=2, query=0)
        emb = model.get_input_embeddings()(ids).detach().requires_grad_()
        model(inputs_embeds=emb, attention_mask=mask)
        row = patch.method.probe_values["cls"]
        assert row.shape == (3, 7)
        assert torch.allclose(row, maps[3][:, 2, 0, :], atol=1e-6)
        assert torch.allclose(row.sum(-1), torch.ones(3)) and torch.all(row[1, 5:] == 0)
        (grad,) = torch.autograd.grad(row[:, 1].sum(), emb)
        assert grad.abs().sum() > 0


def test_adapter_saves_loads_and_detaches(tmp_path):
    model = bert(torch.float32)
    at = AttentionAT(model, mode="iat", xi=0.3, lam=2.0, layers=[0, 1])
    at.save(tmp_path / "at")
    at.detach()
    assert attnpatch.get_patch(model) is None
    loaded = AttentionAT.load(tmp_path / "at", model)
    assert loaded.config == AttentionATConfig(mode="iat", xi=0.3, lam=2.0, layers=(0, 1))
    assert loaded.method.adapter_layers == [0, 1]
    loaded.detach()
    with pytest.raises(RuntimeError, match="detached"):
        _ = loaded.method


def test_lora_model_trains_with_the_trainer(tmp_path):
    peft = pytest.importorskip("peft")
    import transformers as tf

    from attnpatch.adapters.trainer import AttentionATTrainer

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=2)  # fmt: skip
    model = peft.get_peft_model(
        tf.BertForSequenceClassification(cfg),
        peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (32, 8), generator=gen)
    labels = (ids[:, 1] > 32).long()  # the label is in token 1
    ones = torch.ones(8, dtype=torch.long)
    rows = [{"input_ids": i, "attention_mask": ones, "labels": y} for i, y in zip(ids, labels, strict=True)]
    at = AttentionAT(model, mode="iat", xi=0.5)
    args = tf.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=3, learning_rate=5e-3,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
    )  # fmt: skip
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer = AttentionATTrainer(model=model, args=args, train_dataset=rows, attention_at=at)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0]
    changed = [not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_B" in n]
    assert changed and all(changed)
    at.detach()


def test_bad_inputs_give_clear_errors():
    model = bert(torch.float32)
    with pytest.raises(TypeError, match="transformers model"):
        AttentionAT(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        AttentionAT(model, layers=[9])
    with pytest.raises(ValueError, match="mode must be"):
        AttentionAT(model, mode="fgsm")
    at = AttentionAT(model, layers=[1])
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="layer 0 is not reached"):
        with at.method.perturbed({0: torch.zeros(3, 4, 7, 7)}):
            pass
    with pytest.raises(ValueError, match=r"perturbation for layer 1 has shape \(3, 4, 7, 6\)"):
        with at.method.perturbed({1: torch.zeros(3, 4, 7, 6)}):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="head 4 is out of range"):
        at.method.add_probe("p", layer=1, head=4)
    at.method.add_probe("p", layer=1, head=0, query=7)
    with pytest.raises(IndexError, match="query 7 is out of range"):
        model(input_ids=ids, attention_mask=mask)
    at.method.remove_probe("p")
    with pytest.raises(ValueError, match="at least 2 examples"):
        iat_direction({1: torch.zeros(1, 4, 7, 7)}, {1: (torch.zeros(1, 4, 7, 7), torch.ones(1, 1, 7, 7, dtype=bool))})
    at.detach()
