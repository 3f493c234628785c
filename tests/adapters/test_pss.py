"""PSS: entropy and mining rules, progressive rounds on a constructed example, the loss in both conventions, the
aspect-attention head, the self-attention probe adapter, ABSA data reading and erasure, and a LoRA training run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from attnpatch.adapters.pss import (
    AspectAttentionHead,
    PSSConfig,
    PSSProbe,
    entropy_bits,
    mine_round,
    progressive_mining,
    pss_loss,
    tokens_to_words,
)
from attnpatch.eval.absa import encode_words, load_absa, parse_line

from tiny_models import minilm_tokenizer, tiny_model

ABSA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "absa"


def test_entropy_in_bits_over_nonzero_entries():
    uniform16 = torch.full((1, 20), 1 / 16)
    uniform16[0, 16:] = 0
    assert torch.allclose(entropy_bits(uniform16), torch.tensor([4.0], dtype=torch.float64))
    signed = torch.tensor([[0.5, -0.25, 0.25, 0.0]])
    assert torch.allclose(entropy_bits(signed), torch.tensor([1.5], dtype=torch.float64))


def test_mining_takes_the_argmax_word_of_confident_rows_only():
    alpha = torch.tensor(
        [
            [0.05, 0.8, 0.05, 0.1, 0.0],  # confident, correct: mine word 1 (active)
            [-0.1, -0.1, -0.7, -0.1, 0.0],  # confident, wrong: mine word 2 (misleading)
            [0.2, 0.2, 0.2, 0.2, 0.2],  # log2(5) = 2.32 bits: above a 2-bit threshold
            [0.0, 0.0, 0.0, 0.0, 0.0],  # all erased
        ]
    )
    mined = mine_round(alpha, entropy_threshold=2.0)
    assert mined.word.tolist() == [1, 2, -1, -1]
    assert mined.active.tolist() == [True, False, False, False]
    assert mined.count == 2


def test_progressive_rounds_erase_planted_words_in_order():
    """Example 0 attends to word 3, then (once 3 is erased) word 6, then spreads out; example 1 is always wrong and
    attends to word 1; example 2 never concentrates."""
    calls = []

    def train_and_record(erased):
        calls.append([set(e) for e in erased])
        alpha = torch.full((3, 8), 1 / 8)
        if 3 not in erased[0]:
            alpha[0] = torch.tensor([0.02, 0.02, 0.02, 0.86, 0.02, 0.02, 0.02, 0.02])
        elif 6 not in erased[0]:
            alpha[0] = torch.tensor([0.02, 0.02, 0.02, 0.0, 0.02, 0.02, 0.88, 0.02])
        alpha[1] = torch.tensor([0.01, 0.9, 0.01, 0.02, 0.02, 0.02, 0.01, 0.01]) if 1 not in erased[1] else alpha[1]
        return alpha, torch.tensor([True, False, True])

    mined = progressive_mining(train_and_record, 3, PSSConfig(rounds=3, entropy_bits=2.0))
    assert calls == [[set(), set(), set()], [{3}, {1}, set()], [{3, 6}, {1}, set()]]
    assert mined.per_round == [2, 1, 0]
    assert mined.words[0] == [(3, True, 0), (6, True, 1)] and mined.words[1] == [(1, False, 0)]
    amask, avalue = mined.targets(8)
    assert amask[0].nonzero().flatten().tolist() == [3, 6] and avalue[0].sum() == 2
    assert amask[1, 1] == 1 and avalue[1, 1] == 0 and amask[2].sum() == 0
    assert mined.erased(rounds=1) == [{3}, {1}, set()]


def test_pss_loss_in_both_conventions():
    alpha = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    amask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    avalue = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # row 1: a misleading word only
    one = ((0.5 - 1) ** 2 + (0.3 - 1) ** 2 + 0.8**2) / 2
    uniform = ((0.5 - 0.5) ** 2 + (0.3 - 0.5) ** 2 + 0.8**2) / 2
    assert math.isclose(pss_loss(alpha, amask, avalue, "one").item(), one, rel_tol=1e-6)
    assert math.isclose(pss_loss(alpha, amask, avalue, "uniform").item(), uniform, rel_tol=1e-6)
    with pytest.raises(ValueError, match="one shape"):
        pss_loss(alpha, amask[:, :2], avalue)


def test_aspect_head_attends_over_context_words_only_and_is_differentiable():
    torch.manual_seed(0)
    head = AspectAttentionHead(16, num_labels=3).eval()
    hidden = torch.randn(2, 6, 16, requires_grad=True)
    aspect = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]])
    context = torch.tensor([[0, 1, 0, 0, 1, 0], [0, 0, 1, 1, 1, 0]])
    logits, alpha = head(hidden, aspect, context)
    assert logits.shape == (2, 3)
    assert torch.allclose(alpha.sum(-1), torch.ones(2)) and torch.all(alpha[context == 0] == 0)
    (grad,) = torch.autograd.grad(alpha[0, 1], hidden)
    assert grad.abs().sum() > 0
    with pytest.raises(ValueError, match="at least one aspect token"):
        head(hidden, torch.zeros_like(aspect), context)


def test_tokens_to_words_sums_subtokens():
    alpha = torch.tensor([[0.0, 0.2, 0.3, 0.5, 0.0]])
    word_ids = torch.tensor([[-1, 0, 0, 1, -1]])
    assert torch.allclose(tokens_to_words(alpha, word_ids, 3), torch.tensor([[0.5, 0.5, 0.0]]))


def train_toy_classifier(steps: int = 120):
    """A tiny BERT + aspect head where the label is carried by one word ('good' / 'bad'); returns what the
    mining round needs."""
    from attnpatch.adapters.pss import AspectAttentionHead

    tok = minilm_tokenizer()
    gen = torch.Generator().manual_seed(0)
    fillers = ["the", "screen", "was", "and", "it", "came", "with", "a", "box", "today", "very", "my"]
    sentences, aspects, labels, planted = [], [], [], []
    for _ in range(64):
        words = [fillers[int(i)] for i in torch.randint(len(fillers), (7,), generator=gen)]
        at = int(torch.randint(1, 7, (1,), generator=gen))
        label = int(torch.randint(2, (1,), generator=gen))
        words[at] = "good" if label else "bad"
        words[0] = "battery"
        sentences.append(tuple(words))
        aspects.append((0, 1))
        labels.append(label)
        planted.append(at)
    batch = encode_words(tok, sentences, aspects)
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, max_position_embeddings=32)  # fmt: skip
    encoder = tf.BertModel(cfg, add_pooling_layer=False)
    head = AspectAttentionHead(32, num_labels=2, dropout=0.0)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    y = torch.tensor(labels)
    for _ in range(steps):
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits, _ = head(hidden, batch["aspect_mask"], batch["context_mask"])
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits, alpha = head(hidden, batch["aspect_mask"], batch["context_mask"])
    words = tokens_to_words(alpha, batch["word_ids"], 7)
    return words, logits.argmax(-1) == y, torch.tensor(planted)


def test_mining_a_trained_model_finds_the_planted_sentiment_word():
    words, correct, planted = train_toy_classifier()
    assert correct.float().mean() > 0.95
    mined = mine_round(words * torch.where(correct, 1.0, -1.0)[:, None], entropy_threshold=2.5)  # < log2(6 words)
    hits = (mined.word == planted).float().mean()
    assert hits > 0.9, f"mined the planted word in {hits:.0%} of examples"
    assert bool(mined.active[mined.word >= 0].all())


def test_pss_probe_is_a_differentiable_attention_row_and_saves(tmp_path):
    model = tiny_model("bert")
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    probe = PSSProbe(model, probe=(2, 1, 0), lam=0.5, target="one")
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=emb)
    alpha = probe.attention()
    assert alpha.shape == (2, 6) and torch.allclose(alpha.sum(-1), torch.ones(2))
    amask = torch.zeros(2, 6)
    amask[:, 3] = 1
    loss = probe.loss(amask, amask.clone())
    assert math.isclose(loss.item(), 0.5 * ((alpha[:, 3] - 1) ** 2).mean().item(), rel_tol=1e-5)
    (grad,) = torch.autograd.grad(loss, emb)
    assert grad.abs().sum() > 0
    probe.save(tmp_path / "pss")
    probe.detach()
    loaded = PSSProbe.load(tmp_path / "pss", model)
    assert loaded.config.probe == (2, 1, 0) and loaded.config.lam == 0.5
    loaded.detach()


def test_pss_bad_inputs():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="needs probe"):
        PSSProbe(model)
    with pytest.raises(ValueError, match="head 9 is out of range"):
        PSSProbe(model, probe=(1, 9, 0))
    with pytest.raises(ValueError, match="layer 7 is out of range"):
        PSSProbe(model, probe=(7, 0, 0))
    with pytest.raises(ValueError, match="target must be"):
        PSSConfig(target="half")
    probe = PSSProbe(model, probe=(1, 0, 12))
    with pytest.raises(IndexError, match="query 12 is out of range"):
        model(input_ids=torch.ones(1, 5, dtype=torch.long))
    probe.detach()


def test_absa_files_parse_and_bad_lines_name_their_source(tmp_path):
    if not (ABSA / "laptop_val" / "train.txt").is_file():
        pytest.skip("../shared/data/absa is not beside the project")
    examples = load_absa(ABSA / "laptop_val" / "train.txt")
    assert len(examples) >= 1833 and {e.label for e in examples} == {0, 1, 2}
    raw = (ABSA / "laptop_val" / "train.txt").read_text().splitlines()[0].split(" ")
    first = examples[0]
    tagged = tuple(t[:-2] for t in raw if t[-2:] in ("/p", "/n", "/0"))
    assert first.words[first.aspect[0] : first.aspect[1]] == tagged and "/" not in " ".join(first.words)
    nbsp = parse_line("unable to install and uninstall\xa0/n some programs .", "x:584")  # as in laptop_val
    assert nbsp[0].words[nbsp[0].aspect[0]] == "uninstall" and nbsp[0].label == 0
    two = parse_line("the food/p was great but the service/n slow", "x:1")
    assert [(e.aspect, e.label) for e in two] == [((1, 2), 2), ((6, 7), 0)]
    bad = tmp_path / "bad.txt"
    bad.write_text("good food/p here\nno labels on this line\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: no aspect label"):
        load_absa(bad)


def test_encoding_marks_aspect_context_and_erases_words():
    tok = minilm_tokenizer()
    words = [("the", "battery", "life", "is", "terrible"), ("great", "screen")]
    batch = encode_words(tok, words, [(1, 3), (1, 2)], erased=[{4}, set()])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert tok.convert_ids_to_tokens(ids[0][batch["aspect_mask"][0].bool()].tolist()) == ["battery", "life"]
    assert batch["word_ids"][0][batch["context_mask"][0].bool()].tolist() == [0, 3]  # "terrible" is erased
    erased_pos = (ids[0] == tok.pad_token_id) & (mask[0] == 0)
    assert int(erased_pos.sum()) >= 1 and batch["context_mask"][1].sum() == 1
    sentence = encode_words(tok, [("fine", "movie")])
    assert sentence["aspect_mask"][0].nonzero().flatten().tolist() == [0]  # [CLS] stands in for the aspect


def test_lora_model_trains_with_the_pss_loss():
    peft = pytest.importorskip("peft")
    tok = minilm_tokenizer()
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=32)  # fmt: skip
    encoder = peft.get_peft_model(tf.BertModel(cfg), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    head = AspectAttentionHead(32, num_labels=3, dropout=0.0)
    words = [("the", "battery", "life", "is", "terrible"), ("great", "screen", "and", "keys")]
    batch = encode_words(tok, words, [(1, 3), (1, 2)])
    amask = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    avalue = amask.clone()
    y = torch.tensor([0, 2])
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(40):
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits, alpha = head(hidden, batch["aspect_mask"], batch["context_mask"])
        word_alpha = tokens_to_words(alpha, batch["word_ids"], 5)
        reg = pss_loss(word_alpha, amask, avalue, "uniform")
        loss = torch.nn.functional.cross_entropy(logits, y) + 0.5 * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(reg.item())
    assert losses[-1] < losses[0] * 0.5, losses  # the mined words' attention moved to its target
