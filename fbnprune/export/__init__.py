"""Export stage: slim checkpoints that stock tools load, written atomically with their provenance."""

from __future__ import annotations

from fbnprune.export.hf import export_hf, load_pretrained

__all__ = ["export_hf", "load_pretrained"]
