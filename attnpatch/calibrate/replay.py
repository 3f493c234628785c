"""Run a model's decoder stack from layer `start` on hidden states cached from an earlier pass.

Calibrating layer l never changes what layers below l compute, so their output is computed once and replayed: the
layers below `start` become identities for the duration, and a forward pre-hook on layer `start` swaps in the cached
input. Embeddings, masks and rotary tables are still built by the model (cheap), so any family whose decoder layers
sit in one ModuleList works without knowing its forward signature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..integrations.structure import decoder_layers, layer_input


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


class Replay:
    """Cached inputs of one decoder layer, per batch, and the context managers that use or fill them."""

    def __init__(self, model: nn.Module):
        self.layers = decoder_layers(model)
        self.tuple_output = False  # transformers < 5 decoder layers return (hidden_states, ...)
        self._kind_seen = False

    @contextlib.contextmanager
    def start_at(self, start: int, hidden: torch.Tensor | None) -> Iterator[None]:
        """Within the block, a forward skips layers < start and feeds `hidden` to layer `start`."""
        if start == 0 or hidden is None:
            yield
            return
        tuple_output = self.tuple_output

        def identity(hidden_states, *args, **kwargs):
            return (hidden_states,) if tuple_output else hidden_states

        def swap(module, args, kwargs):
            cached = hidden.to(layer_input(args, kwargs).device)
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        for layer in self.layers[:start]:
            layer.forward = identity
        handle = self.layers[start].register_forward_pre_hook(swap, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for layer in self.layers[:start]:
                del layer.forward

    @contextlib.contextmanager
    def capture_input(self, layer: int, store: list) -> Iterator[None]:
        """Within the block, a forward appends layer `layer`'s input hidden states to `store` and stops there."""

        def grab(module, args, kwargs):
            store.append(layer_input(args, kwargs).detach().clone())
            raise StopForward

        def output_kind(module, args, output):
            self.tuple_output, self._kind_seen = isinstance(output, tuple), True

        handles = [self.layers[layer].register_forward_pre_hook(grab, with_kwargs=True)]
        if layer > 0 and not self._kind_seen:  # seen on a layer that really runs (the first capture starts at 0)
            handles.append(self.layers[layer - 1].register_forward_hook(output_kind))
        try:
            yield
        except StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
