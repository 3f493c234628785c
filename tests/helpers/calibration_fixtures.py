"""A tiny model with one planted helpful ACT head, a word-level tokenizer for it, and items it answers."""

from __future__ import annotations

import torch

from attnpatch.eval.tasks import Item

from tiny_models import SINK_TOKEN, SINK_TOKEN_2, VOCAB, planted_sink_model

HELPFUL = (1, 2)  # (layer, head) whose calibration moves probability to the right answer
RIGHT, WRONG = 40, 41


def word_tokenizer():
    """Token "tN" has id N; id 1 is BOS, 0 is padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(2, VOCAB)}
    vocab.update({"<pad>": 0, "<s>": 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>")


def planted_helpful_model():
    """Only head 2 of layer 1 reaches the logits. Its sinks (SINK_TOKEN, SINK_TOKEN_2) carry a value that votes for
    WRONG, every other token a value that votes for RIGHT; so damping the hidden sinks (ACT) helps, and ACT on any
    other head changes nothing."""
    model = planted_sink_model("sdpa")
    cfg = model.config
    d = cfg.head_dim
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 1:5] = 0.0
        emb[2:, 1] = 1.0  # content marker
        emb[[SINK_TOKEN, SINK_TOKEN_2], 1] = 0.0
        emb[[SINK_TOKEN, SINK_TOKEN_2], 2] = 1.0  # sink marker
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.zero_()
            layer.self_attn.o_proj.weight.zero_()
        attn = model.model.layers[HELPFUL[0]].self_attn
        kv = HELPFUL[1] // (cfg.num_attention_heads // cfg.num_key_value_heads)
        attn.v_proj.weight[kv * d : (kv + 1) * d] = 0.0
        attn.v_proj.bias[kv * d : (kv + 1) * d] = 0.0
        attn.v_proj.weight[kv * d, 1] = 1.0
        attn.v_proj.weight[kv * d + 1, 2] = 1.0
        head = HELPFUL[1] * d
        attn.o_proj.weight[3, head] = 20.0
        attn.o_proj.weight[4, head + 1] = 20.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[RIGHT, 3] = 4.0
        model.lm_head.weight[WRONG, 4] = 4.0
    return model


def planted_items(n: int = 12) -> list[Item]:
    """Contexts with one or two hidden sinks among content tokens; the answer is always RIGHT."""
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        words = [int(w) for w in torch.randint(10, 30, (6 + i % 5,), generator=g)]
        words.insert(2, SINK_TOKEN)
        if i % 2:
            words.insert(4, SINK_TOKEN_2)
        context = " ".join(f"t{w}" for w in words)
        items.append(Item(context, [f" t{RIGHT}", f" t{WRONG}"], 0, f"planted/{i}"))
    return items
