"""Parameters of the discover stage, validated once (strict pydantic, like every recipe section).

Example recipe section::

    discover:
      method: canica        # spatial CanICA (the pruning paper); "fastica" = temporal ICA (the first paper)
      n_components: 128
      n_restarts: 10
      block_texts: 40       # one run per disjoint block of 40 calibration texts
      threshold: 3.6        # membership: |z| > threshold
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DiscoverConfig(BaseModel):
    """How functional networks are found. Defaults reproduce the reference CPU CanICA settings.

    Example:
        >>> DiscoverConfig(n_components=64, threshold=3.0).n_restarts
        10
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Literal["canica", "fastica"] = Field(
        "canica", description="canica: spatial ICA of neuron loadings; fastica: temporal ICA of token time courses"
    )
    n_components: int = Field(128, gt=0, description="ICA components (k) per run and window")
    n_restarts: int = Field(10, gt=0, description="FastICA restarts per run; the sparsest result is kept (canica)")
    block_texts: int | None = Field(40, gt=0, description="texts per run (disjoint blocks); None = one block of all rows")
    block_rows: int | None = Field(None, gt=0, description="or: rows (tokens) per run, when texts are not known")
    n_runs: int | None = Field(None, gt=0, description="runs to do (the first blocks); None = all complete blocks")
    threshold: float = Field(3.6, gt=0, description="tau: a neuron is a member of a network when |z| > tau")
    fun: Literal["cube", "logcosh", "exp"] = Field("cube", description="FastICA contrast (reference: cube)")
    max_iter: int = Field(300, gt=0)
    tol: float = Field(1e-4, gt=0)
    seed: int = Field(327, ge=0, description="reference: 327 for every run")
    vary_seed: bool = Field(False, description="use seed + run index (the reference reuses one seed)")
    max_retries: int = Field(2, ge=0, description="a failed run is retried with another seed this many times")
    window: int = Field(1, gt=0, description="consecutive layers per ICA (1 = single-layer ICA)")
    solver: Literal["picard-o", "fastica"] = Field(
        "picard-o",
        description="torch backend: picard-o (quasi-Newton, same objective, far fewer iterations) or fastica "
        "(the fixed-point iteration scikit-learn runs)",
    )
    backend: Literal["torch", "sklearn", "picard"] = Field("torch", description="sklearn/picard: CPU reference solvers")
    device: str = Field("cpu", description="torch device for the torch backend (cpu, cuda, cuda:1, ...)")
    dtype: Literal["float32", "float64"] = Field("float32", description="ICA precision of the torch backend")
    pca_iters: int = Field(4, ge=0, description="power iterations of the randomized PCA (reference: 4)")
    ddof: int = Field(1, ge=0, le=1, description="z-scoring of neurons over tokens (reference: ddof 1)")
    skip_first: int = Field(
        1, ge=0, description="ignore the first positions of every sequence (the attention sink, whose outlier "
        "activations would dominate the z-scores) even when the store kept them for scoring and re-fits"
    )
    match_threshold: float = Field(
        0.3, gt=0, le=1, description="Jaccard overlap at which two runs' networks count as the same network"
    )

    @model_validator(mode="after")
    def _one_block_size(self) -> DiscoverConfig:
        if self.block_texts is not None and self.block_rows is not None and "block_texts" in self.model_fields_set:
            raise ValueError("give block_texts or block_rows, not both")
        if self.block_rows is not None and "block_texts" not in self.model_fields_set:
            self.__dict__["block_texts"] = None
        return self
