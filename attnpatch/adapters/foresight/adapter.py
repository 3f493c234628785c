"""The Foresight adapter (Merlin, Yu et al., ECCV 2024): LoRA on a patched model trained with the LM loss on foresight
targets (FPT: trajectories; FIT: trajectories, then the answer).

FPT/FIT are data and objective recipes, not attention changes: the adapter patches the model with the `adapter` method
(idle unless `layers` are given, e.g. for probes), adds LoRA (PEFT) to it and trains with cross-entropy on the target
tokens only. `vocabulary` optionally restricts the output softmax (training and greedy decoding) to the tokens the
targets use: an exact LM loss over a sub-vocabulary, which makes CPU-sized runs with a 262k-token vocabulary
affordable. Save/load write JSON + safetensors (the LoRA tensors), never pickle; `detach()` removes the patch and the
LoRA layers (the model is bit-identical to before), `detach(keep_lora=True)` only the patch, so that another method
(`attnpatch.apply(model, "act" | "var")`) can patch the fine-tuned model.

    fs = ForesightAdapter(model, lora_r=8)
    losses = fs.fit(batches, steps=100, lr=2e-3)
    texts = fs.generate(collate(rows, pad_id, side="left"), tokenizer, max_new_tokens=60)
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..._version import __version__
from ..base import CONFIG_FILE, STATE_FILE, AttentionAdapterBase, transformers_model
from .tasks import IGNORE_INDEX


@dataclass(frozen=True)
class ForesightConfig:
    """lora_r / lora_alpha / lora_targets: the LoRA added (module names); lora_layers: layers that get LoRA (None:
    all); layers: layers the `adapter` patch reaches (default none: it routes nothing); bins: box quantisation."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_layers: tuple[int, ...] | None = None
    layers: tuple[int, ...] = ()
    bins: int = 100

    def __post_init__(self) -> None:
        for name in ("lora_r", "lora_alpha", "bins"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if isinstance(self.lora_targets, str) or not all(isinstance(t, str) for t in self.lora_targets):
            raise ValueError(f"lora_targets must be a list of module names, got {self.lora_targets!r}")
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if self.lora_layers is not None:
            object.__setattr__(self, "lora_layers", tuple(int(x) for x in self.lora_layers))


class AllowedTokens:
    """A generation logits processor that keeps only `ids` (the rest get -inf)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        keep = torch.full_like(scores, float("-inf"))
        ids = self.ids.to(scores.device)
        keep[:, ids] = scores[:, ids]
        return keep


class RestrictedHead(nn.Module):
    """An output layer that computes the logits of `ids` only and leaves the rest at -inf (full-size output)."""

    def __init__(self, weight: torch.Tensor, ids: torch.Tensor):
        super().__init__()
        self.weight, self.ids = weight, ids.to(weight.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden.new_full((*hidden.shape[:-1], self.weight.shape[0]), float("-inf"))
        logits[..., self.ids] = hidden @ self.weight[self.ids].T.to(hidden.dtype)
        return logits


class ForesightAdapter(AttentionAdapterBase):
    """LoRA + the `adapter` patch on a causal LM or a LLaVA-style model; `self.model` is the PEFT model to call."""

    kind = "foresight"
    config_class = ForesightConfig

    def __init__(self, model: nn.Module, config: ForesightConfig | None = None, **options: Any):
        from peft import LoraConfig, PeftModel, get_peft_model

        if config is None:
            config = ForesightConfig(**options)
        elif options:
            raise TypeError("pass either config= or keyword options, not both")
        base = transformers_model(model)
        if isinstance(model, PeftModel):
            raise ValueError("pass the model without LoRA: the ForesightAdapter adds (and saves) its own")
        for p in base.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(config.lora_targets),
            layers_to_transform=None if config.lora_layers is None else list(config.lora_layers),
            bias="none",
        )
        peft_model = get_peft_model(base, lora)
        try:
            super().__init__(peft_model, config, layers=list(config.layers))
        except Exception:
            peft_model.unload()
            raise
        object.__setattr__(self, "model", peft_model)
        self.register_buffer("vocabulary", None, persistent=False)

    # ---- loss ------------------------------------------------------------------------------------------------------

    def restrict_vocabulary(self, ids: Iterable[int] | None) -> None:
        """Compute the output softmax over `ids` only (sorted, unique; None: the full vocabulary)."""
        if ids is None:
            self.vocabulary = None
            return
        vocab = torch.tensor(sorted({int(i) for i in ids}), dtype=torch.long)
        size = self.target.get_output_embeddings().weight.shape[0]
        if vocab.numel() == 0 or vocab[0] < 0 or vocab[-1] >= size:
            raise ValueError(f"vocabulary ids must be a non-empty set in [0, {size})")
        self.vocabulary = vocab

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.target.get_output_embeddings().weight
        if self.vocabulary is not None:
            weight = weight[self.vocabulary.to(weight.device)]
        logits = hidden @ weight.T.to(hidden.dtype)
        cap = getattr(self.target.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over the tokens whose label is not -100 (labels aligned with input_ids, shifted here).
        Only the labelled positions go through the output layer."""
        labels = batch["labels"]
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        hidden = self.target.base_model(**inputs).last_hidden_state  # the backbone under LoRA
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if not keep.any():
            raise ValueError("the batch has no target tokens (every label is -100)")
        logits = self._head(hidden[:, :-1][keep])
        wanted = targets[keep]
        if self.vocabulary is not None:
            vocab = self.vocabulary.to(wanted.device)
            pos = torch.searchsorted(vocab, wanted)
            if (pos >= vocab.numel()).any() or (vocab[pos.clamp_max(vocab.numel() - 1)] != wanted).any():
                raise ValueError("a target token is outside the restricted vocabulary; restrict_vocabulary(...) again")
            wanted = pos
        return nn.functional.cross_entropy(logits, wanted)

    def fit(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        *,
        steps: int,
        lr: float = 2e-3,
        clip: float = 1.0,
        log=None,
    ) -> list[float]:
        """A plain AdamW loop over `batches` (one per step, at most `steps`); returns the losses."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.model.train()
        losses: list[float] = []
        try:
            for batch in batches:
                if len(losses) >= steps:
                    break
                loss = self.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, clip)
                optimizer.step()
                losses.append(loss.item())
                if log is not None:
                    log(len(losses), losses[-1])
        finally:
            self.model.eval()
        return losses

    # ---- decoding ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self, batch: dict[str, torch.Tensor], tokenizer, *, max_new_tokens: int = 64, **generate_kwargs: Any
    ) -> list[str]:
        """Greedy continuations of a left-padded prompt batch (from `collate(..., side='left')`), decoded; with a
        restricted vocabulary only its tokens are generated."""
        from transformers import LogitsProcessorList

        inputs = {k: v for k, v in batch.items() if k != "labels"}
        processors = LogitsProcessorList([AllowedTokens(self.vocabulary)] if self.vocabulary is not None else [])
        head = self.target.get_output_embeddings()
        if self.vocabulary is not None:  # only the allowed rows of the output layer are computed
            self.target.set_output_embeddings(RestrictedHead(head.weight, self.vocabulary))
        try:
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                top_p=None,
                top_k=None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                logits_processor=processors,
                **generate_kwargs,
            )
        finally:
            self.target.set_output_embeddings(head)
        new = out[:, inputs["input_ids"].shape[1] :]
        return [tokenizer.decode(row, skip_special_tokens=True) for row in new]

    # ---- persistence ------------------------------------------------------------------------------------------------

    def _config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def lora_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(self.model).items()}

    def save(self, directory: str | Path) -> Path:
        """`attnpatch_adapter.json` (kind, config, vocabulary, version) and `attnpatch_adapter.safetensors` (LoRA)."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        vocab = None if self.vocabulary is None else self.vocabulary.tolist()
        meta = {"adapter": self.kind, "attnpatch_version": __version__, "config": self._config_dict(), "vocab": vocab}
        (out / CONFIG_FILE).write_text(json.dumps(meta) + "\n")
        save_file(self.lora_state(), str(out / STATE_FILE))
        return out

    @classmethod
    def load(cls, directory: str | Path, model: nn.Module, **overrides: Any) -> ForesightAdapter:
        """Rebuild a saved ForesightAdapter on `model` (the base model, without LoRA)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / CONFIG_FILE).is_file() or not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path} holds no {CONFIG_FILE} + {STATE_FILE}; save one with adapter.save(...)")
        meta = json.loads((path / CONFIG_FILE).read_text())
        if meta.get("adapter") != cls.kind:
            raise ValueError(f"{path} holds a {meta.get('adapter')!r} adapter, not {cls.kind!r}")
        config = dict(meta["config"])
        for key in ("lora_targets", "lora_layers", "layers"):
            if config.get(key) is not None:
                config[key] = tuple(config[key])
        adapter = cls(model, ForesightConfig(**{**config, **overrides}))
        state = load_file(str(path / STATE_FILE))
        expected = set(adapter.lora_state())
        if set(state) != expected:
            adapter.detach()
            raise ValueError(f"{path}: the saved LoRA tensors do not match this model's LoRA layers")
        set_peft_model_state_dict(adapter.model, state)
        adapter.restrict_vocabulary(meta.get("vocab"))
        return adapter

    def detach(self, keep_lora: bool = False) -> nn.Module:
        """Remove the patch and (unless keep_lora) the LoRA layers; returns the model to use from now on."""
        super().detach()
        if keep_lora:
            return self.model
        if getattr(self.model, "peft_config", None) is not None and hasattr(self.model, "unload"):
            base = self.model.unload()
            object.__setattr__(self, "model", base)
        return self.model


def target_vocabulary(rows: Sequence[Any], extra: Iterable[int] = ()) -> list[int]:
    """The token ids used by the targets (labels != -100) of encoded rows, plus `extra`."""
    ids = {int(t) for row in rows for t in row.labels if t != IGNORE_INDEX}
    return sorted(ids | {int(t) for t in extra})
