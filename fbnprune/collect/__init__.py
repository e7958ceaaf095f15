"""Collect stage: turn text into token sequences and record each MLP neuron's activation.

The recorded signal is the input of every layer's down projection, ``h = act(gate(x)) * up(x)``: exactly what a
pruned neuron stops contributing. Padding rows and the first position of each sequence (the attention sink, whose
outliers dominate statistics) are dropped. Rows stream into an on-disk :class:`ActivationStore`, so peak RAM stays
near the model plus one batch, whatever the token count.
"""

from __future__ import annotations

from fbnprune.collect.capture import capture_activations, collect
from fbnprune.collect.sources import SOURCES, TokenBatch, make_sequences
from fbnprune.collect.store import ActivationStore

__all__ = ["SOURCES", "ActivationStore", "TokenBatch", "capture_activations", "collect", "make_sequences"]
