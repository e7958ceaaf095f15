"""The recipe schema: one strict model per stage. Unknown keys and out-of-range values are errors.

Example recipe (``recipes/quickstart.yaml``)::

    name: quickstart
    description: SmolLM2-135M, 20% of MLP neurons removed by Wanda-sp, uniform widths
    model: {source: smollm2-135m}
    collect: {source: wikitext2-valid, n_tokens: 8192, seq_len: 512}
    prune: {method: wanda_sp, sparsity: 0.2}
    evaluate: {perplexity: [{source: wikitext2-test, seq_len: 512, max_tokens: 16384}]}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fbnprune.discover.config import DiscoverConfig
from fbnprune.errors import UserError
from fbnprune.prune import COMPENSATIONS, DEFAULT_RULE, FBN_RULES, SCORERS, default_compensation, needs
from fbnprune.prune.sequential import NOT_SEQUENTIAL
from fbnprune.recover.config import RecoverConfig
from fbnprune.registry import Registry


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def registered(registry: Registry, name: str) -> str:
    """``name`` if ``registry`` knows it (or an alias of it), else a one-line error listing what it knows.

    The choices of ``prune.method``, ``prune.fbn_rule`` and ``prune.compensate`` are the registries' entries, so a
    scorer, rule or compensation registered in its module is a valid recipe choice without touching this file.
    """
    try:
        registry.canonical(name)
    except UserError as e:  # pydantic collects ValueErrors, so all errors are reported together
        raise ValueError(str(e)) from None
    return name


class ModelConfig(Strict):
    source: str = Field(description="built-in name, .gguf path, local HF directory or Hub id")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"


class CollectConfig(Strict):
    source: str = "wikitext2-valid"
    fallback: str | None = Field("self", description="source to use when `source` needs data that is missing")
    n_tokens: int = Field(8192, gt=0)
    seq_len: int = Field(512, ge=2)
    mode: Literal["pack", "document"] = "pack"
    batch_size: int = Field(4, ge=1)
    seed: int = 0
    keep_activations: bool = True
    drop_first: int = Field(
        0, ge=0, description="positions left out of every sequence's statistics. 0 (default) keeps the first "
        "position: SmolLM2's attention sink drives an MLP output ~800x a normal token's, and scores and re-fits "
        "that never see it prune and re-fit the neurons that make it (benchmarks/fbn_rules, docs/fbn-study.md); "
        "discovery leaves it out by itself (discover.skip_first)"
    )


class PruneConfig(Strict):
    method: str = Field("wanda_sp", description="a registered scorer (fbnprune.prune.SCORERS)")
    fbn_rule: str = Field(
        DEFAULT_RULE, description="how the fbn method turns networks into neuron scores (fbnprune.prune.FBN_RULES): "
        "redundancy (default) removes what the networks can rebuild; max_z is the naive rule"
    )
    sparsity: float | None = Field(0.2, ge=0.0, lt=1.0, description="fraction of MLP neurons removed")
    param_fraction: float | None = Field(None, ge=0.0, lt=1.0, description="or: fraction of all parameters")
    allocation: Literal["uniform", "global"] = "uniform"
    mode: Literal["slice", "mask"] = "slice"
    protected_layers: list[int] | Literal["auto"] = Field(
        "auto", description="layers never pruned; 'auto' (default) = those whose MLP the model can least lose, "
        "measured on the calibration data (none without a collect section); [] = none"
    )
    min_width: int = Field(8, ge=1)
    round_to: int = Field(8, ge=1)
    compensate: str = Field(
        "auto",
        description="a registered compensation (fbnprune.prune.COMPENSATIONS). "
        "auto (default): refit for fbn's redundancy rule and for corr_redundancy, else none; "
        "bias: FLAP mean compensation; refit: ridge least-squares re-fit of kept columns + bias; "
        "anchored: re-fit shrunk toward the original columns; netrefit: each pruned neuron rebuilt from the kept "
        "members of its functional networks; corrrefit: the same with neighbours by activation correlation "
        "(the control); see docs/fbn-study.md",
    )
    ridge: float = Field(1e-3, ge=0.0, description="relative ridge of the refit, netrefit and corrrefit "
                         "compensations and of the obs / redundancy eliminations (anchored has its own, 0.1)")
    gram_shrink: float = Field(
        0.0, ge=0.0, le=1.0, description="shrink the calibration covariance that obs, the redundancy rule and the "
        "re-fits read towards its diagonal by this fraction; for little calibration text (0.5 with about 1,000 "
        "tokens: benchmarks/fbn_rules/regimes.md), 0 = as measured")
    seed: int = 0
    sequential: bool = Field(
        False, description="prune layer by layer, each layer calibrated on the outputs of the already-pruned "
        "layers before it (fbnprune.prune.sequential; docs/pruning.md says when it pays)")
    refit_target: Literal["layer", "dense"] = Field(
        "layer", description="sequential mode, refit compensation: 'layer' (default) re-fits each layer towards "
        "the dense weights' output on the pruned model's inputs; 'dense' towards the dense model's own MLP output "
        "(tries to undo earlier layers' error; measured worse: benchmarks/sequential/results.md)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        return registered(SCORERS, v)

    @field_validator("fbn_rule")
    @classmethod
    def _known_rule(cls, v: str) -> str:
        return registered(FBN_RULES, v)

    @field_validator("compensate")
    @classmethod
    def _known_compensation(cls, v: str) -> str:
        return registered(COMPENSATIONS, v)

    @model_validator(mode="after")
    def _one_budget(self) -> PruneConfig:
        if self.compensate == "auto":  # resolved here, so the saved recipe says what was done
            self.__dict__["compensate"] = default_compensation(SCORERS.canonical(self.method), self.fbn_rule)
        if self.param_fraction is not None and "sparsity" not in self.model_fields_set:
            self.__dict__["sparsity"] = None
        if (self.sparsity is None) == (self.param_fraction is None):
            raise ValueError("give exactly one of sparsity or param_fraction")
        if self.sequential:
            if self.allocation != "uniform":
                raise ValueError("sequential: true needs allocation: uniform (a global allocation ranks every "
                                 "layer's neurons at once, before any layer is pruned)")
            if SCORERS.canonical(self.method) in NOT_SEQUENTIAL:
                raise ValueError(f"method {self.method!r} needs gradients through the whole model and cannot run "
                                 "layer by layer: use sequential: false")
        return self


class PerplexityConfig(Strict):
    source: str = "wikitext2-test"
    seq_len: int = Field(512, ge=2)
    max_tokens: int | None = Field(16384, gt=0, description="score only the first N tokens (a fixed slice)")
    batch_size: int = Field(4, ge=1)


class RetentionConfig(Strict):
    """Data-free retention (KL and top-1 agreement vs dense) on held-out text."""

    source: str = Field("self", description="'self' samples held-out text from the dense model")
    n_tokens: int = Field(4096, gt=0)
    seq_len: int = Field(256, ge=2)
    seed: int = 1234


class EvaluateConfig(Strict):
    perplexity: list[PerplexityConfig] = Field(default_factory=lambda: [PerplexityConfig()])
    retention: RetentionConfig | None = Field(default_factory=RetentionConfig)
    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, gt=0, description="first N items per task; for smoke tests only")
    subset: int | None = Field(None, gt=0, description="fixed seeded subset of N items per task (fair, unlike limit)")
    subset_seed: int = 0
    blimp_per_paradigm: int | None = Field(100, gt=0, description="fixed seeded subset of each blimp file; null = all 1000")
    engine: Literal["packed", "hflm"] = "packed"
    speed: bool = Field(True, description="measure generation tokens/s of the dense and pruned models")
    batch_size: int = Field(8, ge=1)


class ExportConfig(Strict):
    enabled: bool = True
    subdir: str = "model"
    require_stock: bool = Field(
        False, description="fail instead of writing the per-layer (fbnprune.load_pretrained) layout"
    )
    gguf: Literal["f16", "f32"] | None = Field(None, description="also write model-<dtype>.gguf (uniform Llama / Gemma 3)")
    push_to_hub: str | None = Field(None, description="Hub repo id; uploaded after the run (needs network)")
    private: bool = True


class AnalyzeConfig(Strict):
    """``python -m fbnprune analyze``: test the first paper's claims on this model (see docs/findings.md).

    Every condition is applied with hooks on the down projections' inputs (weights untouched) and measured with
    the same probe: perplexity on a fixed slice plus a fixed seeded subset of some tasks.
    """

    perplexity: PerplexityConfig = Field(
        default_factory=lambda: PerplexityConfig(source="wikitext2-test", seq_len=512, max_tokens=4096))
    tasks: list[str] = Field(default_factory=lambda: ["piqa", "arc_easy"])
    subset: int | None = Field(100, gt=0, description="seeded subset of items per task (None = all)")
    subset_seed: int = 0
    batch_size: int = Field(8, ge=1)
    mask_top: list[int] = Field(default_factory=lambda: [1, 2, 5, 10],
                                description="masking: zero the union of the top-n networks of every layer")
    keep_top: list[int] = Field(default_factory=lambda: [1, 2, 5, 10, 20, 50],
                                description="keep-only: zero every neuron outside the top-k networks of every layer")
    amplify_top: int = Field(5, gt=0, description="amplification: scale the top-n networks of every layer")
    gains: list[float] = Field(default_factory=lambda: [1.5, 2.0, 4.0])
    random_seeds: int = Field(3, ge=1, description="random-neuron controls per condition (mean and spread)")
    shuffles: int = Field(20, ge=1, description="neuron shufflings for the chance level of recurrence")
    run: int = Field(0, ge=0, description="which discovery run's networks are masked (the others rank them)")

    @field_validator("mask_top", "keep_top")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(n <= 0 for n in v):
            raise ValueError("needs one or more positive network counts")
        return sorted(set(v))

    @field_validator("gains")
    @classmethod
    def _gains(cls, v: list[float]) -> list[float]:
        if not v or any(g < 0 for g in v):
            raise ValueError("needs one or more gains >= 0")
        return sorted(set(v))


class Recipe(Strict):
    name: str
    description: str = ""
    output_dir: str | None = Field(None, description="default: outputs/<name>")
    seed: int = 0
    model: ModelConfig
    collect: CollectConfig | None = Field(default_factory=CollectConfig)
    discover: DiscoverConfig | None = Field(None, description="ICA settings for prune.method fbn (default settings if omitted)")
    prune: PruneConfig = Field(default_factory=PruneConfig)
    recover: RecoverConfig | None = Field(None, description="distil the dense model into the pruned one (off "
                                          "when omitted); see docs/recovery.md")
    evaluate: EvaluateConfig | None = Field(default_factory=EvaluateConfig)
    export: ExportConfig | None = Field(default_factory=ExportConfig)
    analyze: AnalyzeConfig | None = Field(None, description="settings of `fbnprune analyze` (defaults if omitted)")

    @model_validator(mode="after")
    def _cross_stage(self) -> Recipe:
        p = self.prune
        scorer, compensation = SCORERS.get(p.method).needs, COMPENSATIONS.get(p.compensate).needs
        if scorer.calibration and self.collect is None:
            raise ValueError(f"prune.method {p.method!r} needs calibration data: add a collect section")
        if compensation.calibration and self.collect is None:
            raise ValueError(f"prune.compensate {p.compensate!r} needs calibration statistics: add a collect section")
        if self.collect is not None and not self.collect.keep_activations:
            if scorer.activations or compensation.activations:
                raise ValueError(
                    f"prune.method {p.method!r} / compensate {p.compensate!r} need stored "
                    "activations: set collect.keep_activations: true"
                )
        if p.sequential and self.collect is None:
            raise ValueError("prune.sequential needs calibration text to run the layers on: add a collect section")
        uses_networks = needs(p.method, p.compensate, p.fbn_rule).networks or recover_uses_networks(self)
        if self.discover is not None and not uses_networks and self.analyze is None:
            raise ValueError("a discover section is only used by the fbn methods, netrefit/corrrefit, analyze and "
                             "recover.network_weight")
        if (self.discover is not None and self.discover.block_texts is not None and self.collect is not None
                and self.collect.mode != "document"):
            raise ValueError("discover.block_texts needs collect.mode: document (one text per sequence); "
                             "with packed calibration use discover.block_rows")
        return self

    @model_validator(mode="after")
    def _recover_rules(self) -> Recipe:
        """Recovery must not train on text the run evaluates on, and its network loss needs networks."""
        rc = self.recover
        if rc is None:
            return self
        ev = self.evaluate
        for pc in ev.perplexity if ev is not None else []:
            if pc.source in rc.data:
                raise ValueError(f"recover.data {pc.source!r} is this run's perplexity text (evaluate.perplexity); "
                                 "train on other text")
        ret = ev.retention if ev is not None else None
        if ret is not None and ret.source in rc.data:
            if ret.source != "self":
                raise ValueError(f"recover.data {ret.source!r} is this run's held-out text (evaluate.retention."
                                 "source): KL after recovery would be measured on training text; hold out another "
                                 "source, e.g. evaluate.retention.source: wiki")
            if ret.seed == rc.seed + rc.data.index("self"):
                raise ValueError("recover.data 'self' would sample the same text as evaluate.retention (same seed); "
                                 "change recover.seed or evaluate.retention.seed")
        if recover_uses_networks(self):
            p = self.prune
            if not needs(p.method, p.compensate, p.fbn_rule).networks:
                if self.collect is None or not self.collect.keep_activations:
                    raise ValueError("recover.network_weight > 0 needs functional networks: a collect section with "
                                     "keep_activations: true (discovery then runs for recovery)")
        return self


def recover_uses_networks(recipe: Recipe) -> bool:
    """Whether the recover stage's network-activity loss is on (discovery must then run)."""
    return recipe.recover is not None and recipe.recover.network_weight > 0
