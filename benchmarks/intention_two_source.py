"""Intention conditioning on a constructed two-source task with the real Gemma-3 270M (fp32, CPU, one thread).

    OMP_NUM_THREADS=1 python benchmarks/intention_two_source.py [--train-size 256] [--eval-size 100] [--epochs 1]

Each example holds two speakers' one-sentence transcripts, concatenated ("Speaker 1: I flew to Paris on Monday and
brought my camera. Speaker 2: ..."), built from randomised templates (city, day, object, means of travel, phrasing),
and a question that does not name the speaker ("Where did the speaker travel to?"). The answer is the attended
speaker's value; which speaker is attended (0 or 1, uniform) is the intention. Nothing in the text tells which one:
without the intention the best possible exact match is about 50%.

Held out: for each asked attribute (city, day, object) the unordered pairs of the two speakers' values are split, and
evaluation examples only use pairs that no training example asked about.

Compared, all on the same held-out examples by greedy generation and exact match of the answer:
  (a) the base model, no adapter;
  (b) LoRA (r=8, q_proj/v_proj) trained with the LM loss on the answer tokens, no intention (control);
  (c) LoRA + IntentionConditioner (the intention token inserted after BOS), trained the same way;
  (d) as (c) plus the experimental per-head key bias toward the attended speaker's tokens on a few layers.
Results: benchmarks/results/intention_two_source.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import time
from dataclasses import dataclass
from typing import Any

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MODEL = "gemma-3-270m"

CITIES = [
    "Paris", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo", "Athens",
    "Cairo", "Tokyo", "Seoul", "Lima", "Boston", "Chicago", "Sydney", "Toronto", "Warsaw", "Budapest",
]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
OBJECTS = [
    "camera", "laptop", "guitar", "umbrella", "backpack", "passport", "violin", "bicycle", "notebook", "telescope",
    "kite", "scarf",
]  # fmt: skip
TRAVEL = ["flew to", "took the train to", "drove to", "took the bus to", "sailed to", "cycled to"]
SENTENCES = [
    "I {travel} {city} on {day} and brought my {object}.",
    "On {day} I {travel} {city} with my {object}.",
    "I packed my {object} and {travel} {city} on {day}.",
]
QUESTIONS = {
    "city": ["Where did the speaker travel to?", "Which city did the speaker go to?"],
    "day": ["On which day did the speaker travel?", "What day did the speaker leave?"],
    "object": ["What did the speaker bring?", "Which item did the speaker take along?"],
}
VALUES = {"city": CITIES, "day": DAYS, "object": OBJECTS}


@dataclass
class Example:
    ids: list[int]  # BOS + prompt (no answer)
    answer_ids: list[int]
    segment: list[int]  # 1 on the attended speaker's tokens, over `ids`
    attended: int
    answer: str
    other: str  # the other speaker's value of the asked attribute
    attribute: str
    text: str


def split_pairs(rng: random.Random, held_out: float) -> dict[str, tuple[set, set]]:
    """Per attribute: (training pairs, held-out pairs) of unordered value pairs."""
    out = {}
    for attribute, values in VALUES.items():
        pairs = [frozenset(p) for p in itertools.combinations(values, 2)]
        rng.shuffle(pairs)
        cut = max(1, round(len(pairs) * held_out))
        out[attribute] = (set(pairs[cut:]), set(pairs[:cut]))
    return out


def make_example(rng: random.Random, tokenizer, pairs: dict[str, set], attended: int) -> Example:
    """One example whose asked attribute's value pair comes from `pairs[attribute]`; `attended` is the intention."""
    attribute = rng.choice(sorted(VALUES))
    asked = sorted(rng.choice(sorted(sorted(p) for p in pairs[attribute])))
    rng.shuffle(asked)
    speakers: list[dict[str, str]] = []
    for s in range(2):
        facts = {name: rng.choice(values) for name, values in VALUES.items()}
        if s == 1:  # the speakers differ in every attribute, so no question is answered by both
            for name, values in VALUES.items():
                while facts[name] == speakers[0][name]:
                    facts[name] = rng.choice(values)
        facts[attribute] = asked[s]
        facts["travel"] = rng.choice(TRAVEL)
        speakers.append(facts)
    pieces = [
        ("" if s == 0 else " ") + f"Speaker {s + 1}: " + rng.choice(SENTENCES).format(**f)
        for s, f in enumerate(speakers)
    ]
    question = "\nQuestion: " + rng.choice(QUESTIONS[attribute]) + "\nAnswer:"
    ids, segment = [tokenizer.bos_token_id], [0]
    for s, piece in enumerate(pieces):
        toks = tokenizer(piece, add_special_tokens=False).input_ids
        ids += toks
        segment += [int(s == attended)] * len(toks)
    toks = tokenizer(question, add_special_tokens=False).input_ids
    ids += toks
    segment += [0] * len(toks)
    answer = speakers[attended][attribute]
    return Example(
        ids=ids,
        answer_ids=tokenizer(" " + answer + ".", add_special_tokens=False).input_ids,
        segment=segment,
        attended=attended,
        answer=answer,
        other=speakers[1 - attended][attribute],
        attribute=attribute,
        text="".join(pieces) + question,
    )


def make_data(tokenizer, seed: int, train_size: int, eval_size: int) -> tuple[list[Example], list[Example]]:
    """Training and held-out examples, each half attending speaker 1 and half speaker 2."""
    rng = random.Random(seed)
    pairs = split_pairs(rng, held_out=0.3)
    train_pairs = {a: p[0] for a, p in pairs.items()}
    eval_pairs = {a: p[1] for a, p in pairs.items()}
    train = [make_example(rng, tokenizer, train_pairs, i % 2) for i in range(train_size)]
    evaluation = [make_example(rng, tokenizer, eval_pairs, i % 2) for i in range(eval_size)]
    rng.shuffle(train)
    return train, evaluation


# ---- batches --------------------------------------------------------------------------------------------------------


def collate(examples: list[Example], pad_id: int, with_answer: bool) -> dict[str, torch.Tensor]:
    """Left-padded input_ids, attention_mask, segments, intention and (with the answer appended) labels that are
    -100 everywhere but on the answer tokens."""
    rows = [e.ids + (e.answer_ids if with_answer else []) for e in examples]
    width = max(len(r) for r in rows)
    batch = len(rows)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    segments = torch.zeros(batch, width, dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    for i, (e, row) in enumerate(zip(examples, rows, strict=True)):
        start = width - len(row)
        ids[i, start:] = torch.tensor(row)
        mask[i, start:] = 1
        segments[i, start : start + len(e.segment)] = torch.tensor(e.segment)
        if with_answer:
            labels[i, width - len(e.answer_ids) :] = torch.tensor(e.answer_ids)
    intention = torch.tensor([e.attended for e in examples])
    return {"input_ids": ids, "attention_mask": mask, "segments": segments, "intention": intention, "labels": labels}


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, as `generate` computes them for left-padded prompts."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def answer_loss(model, cond, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on the answer tokens; the LM head runs on the last positions only (the answers end each row)."""
    labels = batch["labels"]
    keep = int((labels != -100).sum(1).max()) + 1
    if cond is None:
        mask = batch["attention_mask"]
        out = model(
            input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids(mask), logits_to_keep=keep
        )
    else:
        out = cond(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["intention"],
            batch["segments"],
            logits_to_keep=keep,
        )
    logits = out.logits[:, :-1].float()
    target = labels[:, -(keep - 1) :]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100
    )


# ---- training and evaluation ----------------------------------------------------------------------------------------


def train(model, examples: list[Example], variant: str, args, pad_id: int, bias_layers: list[int]):
    """LoRA (+ conditioner) trained on the answer loss; returns (peft model, conditioner or None, statistics)."""
    from peft import LoraConfig, get_peft_model

    from attnpatch.adapters.intention import IntentionConditioner

    torch.manual_seed(args.seed)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], bias="none")
    peft_model = get_peft_model(model, lora)
    cond = None
    if variant != "lora":
        layers = bias_layers if variant == "lora+intention+bias" else None
        cond = IntentionConditioner(peft_model, num_intentions=2, bias_layers=layers, insert_after=1)
    groups = [{"params": [p for p in peft_model.parameters() if p.requires_grad], "lr": args.lr}]
    if cond is not None:
        groups.append({"params": [cond.embeddings], "lr": args.cond_lr})
        if cond.head_bias:
            groups.append({"params": list(cond.head_bias.parameters()), "lr": args.bias_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    order = random.Random(args.seed)
    peft_model.train()
    losses, step_times = [], []
    for _ in range(args.epochs):
        index = list(range(len(examples)))
        order.shuffle(index)
        for start in range(0, len(index), args.batch_size):
            batch = collate([examples[i] for i in index[start : start + args.batch_size]], pad_id, with_answer=True)
            t0 = time.perf_counter()
            loss = answer_loss(peft_model, cond, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            step_times.append(time.perf_counter() - t0)
            losses.append(loss.item())
            print(f"  {variant} step {len(losses)}: loss {losses[-1]:.3f} ({step_times[-1]:.1f} s)", flush=True)
    peft_model.eval()
    stats = {
        "steps": len(losses),
        "loss_first5": sum(losses[:5]) / len(losses[:5]),
        "loss_last5": sum(losses[-5:]) / len(losses[-5:]),
        "losses": [round(x, 4) for x in losses],
        "train_s": round(sum(step_times), 1),
        "step_s_mean": round(sum(step_times) / len(step_times), 2),
    }
    if cond is not None and cond.head_bias:
        stats["learned_head_bias"] = {k: [round(x, 3) for x in v.tolist()] for k, v in cond.head_bias.items()}
    return peft_model, cond, stats


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion k / n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [round(centre - half, 3), round(centre + half, 3)]


@torch.no_grad()
def evaluate(model, cond, tokenizer, examples: list[Example], args) -> dict[str, Any]:
    """Greedy generation; a prediction is the text before the first '.' or newline, compared exactly."""
    max_new = max(len(e.answer_ids) for e in examples) + 1
    pad_id = tokenizer.pad_token_id
    gen = dict(max_new_tokens=max_new, do_sample=False, top_p=None, top_k=None, pad_token_id=pad_id)
    correct = other = 0
    by_attended = {"0": [0, 0], "1": [0, 0]}
    by_attribute = {a: [0, 0] for a in VALUES}
    samples = []
    t0 = time.perf_counter()
    for start in range(0, len(examples), args.eval_batch_size):
        chunk = examples[start : start + args.eval_batch_size]
        batch = collate(chunk, pad_id, with_answer=False)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if cond is None:
            new = model.generate(input_ids=ids, attention_mask=mask, **gen)[:, ids.shape[1] :]
        else:
            new = cond.generate(model, ids, mask, batch["intention"], batch["segments"], **gen)
        for e, row in zip(chunk, new, strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            pred = text.strip().replace("\n", ".").split(".")[0].strip()
            ok = pred == e.answer
            correct += ok
            other += pred == e.other
            by_attended[str(e.attended)][0] += ok
            by_attended[str(e.attended)][1] += 1
            by_attribute[e.attribute][0] += ok
            by_attribute[e.attribute][1] += 1
            if len(samples) < 6:
                samples.append({"attended": e.attended, "answer": e.answer, "generated": text})
    n = len(examples)
    return {
        "accuracy": round(correct / n, 3),
        "correct": correct,
        "total": n,
        "wilson95": wilson(correct, n),
        "other_speaker": other,
        "neither": n - correct - other,
        "by_attended_speaker": {k: {"correct": v[0], "total": v[1]} for k, v in by_attended.items()},
        "by_attribute": {k: {"correct": v[0], "total": v[1]} for k, v in by_attribute.items()},
        "eval_s": round(time.perf_counter() - t0, 1),
        "samples": samples,
    }


# ---- report ---------------------------------------------------------------------------------------------------------

LABELS = {
    "base": "(a) base model, no adapter",
    "lora": "(b) LoRA, no intention (control)",
    "lora+intention": "(c) LoRA + intention token",
    "lora+intention+bias": "(d) LoRA + intention token + key bias",
}


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    lines = [
        "# Intention conditioning on a two-source task (Gemma-3 270M)",
        "",
        f"Device: {report['device']}; torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}, peft {report['versions']['peft']}; generated by "
        f"`benchmarks/intention_two_source.py`; total {report['total_s']:.0f} s.",
        "",
        f"Two speakers' one-sentence transcripts, a question that does not name the speaker; the attended speaker "
        f"(0/1, balanced) is the intention. {cfg['train_size']} training examples x {cfg['epochs']} epoch(s), batch "
        f"{cfg['batch_size']}, LoRA r=8 on q_proj/v_proj (lr {cfg['lr']}), intention embeddings lr {cfg['cond_lr']}, "
        f"key bias lr {cfg['bias_lr']}; "
        f"{cfg['eval_size']} held-out examples (value pairs never asked about in training), greedy exact match. "
        f"Key bias layers in (d): {cfg['bias_layers']}. Seed {cfg['seed']}.",
        "",
        "| variant | exact match | 95% CI | other speaker's value | neither | speaker 1 / speaker 2 attended "
        "| train loss first5 -> last5 | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in report["results"].items():
        ev, tr = result["eval"], result.get("train")
        att = ev["by_attended_speaker"]
        per = f"{att['0']['correct']}/{att['0']['total']} / {att['1']['correct']}/{att['1']['total']}"
        loss = f"{tr['loss_first5']:.2f} -> {tr['loss_last5']:.2f}" if tr else "-"
        secs = f"{tr['train_s']:.0f}" if tr else "-"
        lines.append(
            f"| {LABELS[name]} | {ev['correct']}/{ev['total']} ({ev['accuracy']:.0%}) | "
            f"{ev['wilson95'][0]:.2f}-{ev['wilson95'][1]:.2f} | {ev['other_speaker']} | {ev['neither']} | {per} | "
            f"{loss} | {secs} |"
        )
    lines += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-size", type=int, default=256)
    parser.add_argument("--eval-size", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=25)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--cond-lr", type=float, default=5e-2)
    parser.add_argument("--bias-lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--out", default=os.path.join(RESULTS, "intention_two_source"))
    args = parser.parse_args()

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    import peft
    import transformers

    from attnpatch.models import load

    random.seed(args.seed)
    t0 = time.perf_counter()
    model, tokenizer = load(MODEL, dtype=torch.float32)
    load_s = time.perf_counter() - t0
    for p in model.parameters():
        p.requires_grad_(False)
    pad_id = tokenizer.pad_token_id
    types = getattr(model.config, "layer_types", None) or []
    bias_layers = [i for i, t in enumerate(types) if t == "full_attention"] or [model.config.num_hidden_layers - 1]
    train_set, eval_set = make_data(tokenizer, args.seed, args.train_size, args.eval_size)
    probe = collate(eval_set[:2], pad_id, with_answer=False)
    with torch.no_grad():
        reference = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits

    results: dict[str, Any] = {}
    restored = True
    for variant in args.variants:
        print(f"{variant}:", flush=True)
        if variant == "base":
            results[variant] = {"eval": evaluate(model, None, tokenizer, eval_set, args)}
        else:
            peft_model, cond, stats = train(model, train_set, variant, args, pad_id, bias_layers)
            results[variant] = {"train": stats, "eval": evaluate(peft_model, cond, tokenizer, eval_set, args)}
            if cond is not None:
                cond.detach()
            model = peft_model.unload()  # the LoRA layers removed, the base weights untouched
            with torch.no_grad():
                again = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
            restored = restored and torch.equal(again, reference)
        ev = results[variant]["eval"]
        print(f"  {LABELS[variant]}: {ev['correct']}/{ev['total']} (other speaker {ev['other_speaker']})", flush=True)

    prompt_lengths = [len(e.ids) for e in train_set + eval_set]
    report = {
        "task": "two-source question answering, the attended speaker given only as the intention index",
        "model": MODEL,
        "dtype": "float32",
        "device": "CPU, 1 thread",
        "platform": platform.platform(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "config": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "optimizer": "AdamW, weight decay 0, grad-norm clip 1.0",
            "loss": "cross-entropy on the answer tokens (' <value>.') only",
            "intention": {"num_intentions": 2, "insert_after": 1, "init": "mean embedded token + 0.1 std noise"},
            "bias_layers": bias_layers,
            "held_out_fraction_of_value_pairs": 0.3,
        },
        "seeds": {"data": args.seed, "torch": args.seed, "batch_order": args.seed},
        "data": {
            "train": len(train_set),
            "eval": len(eval_set),
            "prompt_tokens_mean": round(sum(prompt_lengths) / len(prompt_lengths), 1),
            "eval_attended_speaker_2_fraction": sum(e.attended for e in eval_set) / len(eval_set),
            "example": eval_set[0].text + " " + eval_set[0].answer + ".",
        },
        "model_load_s": round(load_s, 1),
        "base_model_restored_after_each_variant": restored,
        "results": results,
        "total_s": round(time.perf_counter() - t_start, 1),
        "notes": [
            "Without the intention the text does not say which speaker is meant: the best a model can do is about "
            "50% (always one speaker); 'other speaker' counts answers that name the unattended speaker's value.",
            "(a) is not fine-tuned to the answer format: most of its misses are answers in another form (e.g. 'I was "
            "in'), so its score is not a measure of speaker choice.",
            "(d) is the experimental, non-paper variant: learned per-head logit bias toward the attended speaker's "
            "tokens (it starts at 0).",
            "One seed, one run; the intervals are binomial (Wilson) over the held-out examples only.",
            "The learning rates were chosen on pilot runs with data seed 1 (192 training / 40 held-out examples, not "
            "the examples reported here): with intention-embedding lr 1e-2, (c) reached 27/40 and (d) 40/40; with "
            "5e-2, (c) reached 40/40. No other setting was tried.",
        ],
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
