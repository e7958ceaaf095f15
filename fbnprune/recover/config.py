"""Parameters of the recover stage, validated once at recipe load (strict pydantic, like every recipe section).

Example recipe section::

    recover:
      method: full            # or lora (peft adapters, merged before export)
      target_modules: [mlp]   # projection names, or the groups mlp / attention / all
      data: [c4, technical]   # never the evaluation text
      lr: 1.0e-4
      batch_size: 8
      seq_len: 256
      max_minutes: 15         # and/or max_tokens; training stops at whichever comes first
"""

from __future__ import annotations

import difflib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Projection names of the supported architectures (Llama-like, Phi-3's fused ones, GPT-2's Conv1D), and groups
# resolved per model: ``mlp`` = the MLP's projections, ``attention`` = every other projection of a decoder layer.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
               "gate_up_proj", "c_attn", "c_proj", "c_fc")
GROUPS = ("all", "mlp", "attention")
# The evaluation text: training on it would measure memorisation, not recovery.
EVALUATION_TEXT = "wikitext2-test"
DEFAULT_LR = {"lora": 5e-4, "full": 1e-4}  # the settings of the first measurements (SmolLM2, OBS + re-fit)
DEFAULT_TARGETS = {"lora": ["all"], "full": ["mlp"]}
LORA_ONLY = ("rank", "alpha", "dropout")


class RecoverConfig(BaseModel):
    """Distillation of the dense model (teacher) into the pruned one (student); see ``docs/recovery.md``.

    ``lr`` and ``target_modules`` left out take the method's default (LoRA 5e-4 on every projection, full
    fine-tuning 1e-4 on the MLP), written into the resolved recipe.

    Example:
        >>> RecoverConfig(method="full", max_tokens=65536).lr
        0.0001
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Literal["lora", "full"] = Field(
        "lora", description="lora: peft LoRA adapters, merged into the weights at the end; full: train the chosen "
        "modules' own weights")
    target_modules: list[str] | None = Field(
        None, description="projection names (q_proj, gate_proj, ...) or groups (mlp, attention, all) inside the "
        "decoder layers; default: all for lora, mlp for full")
    rank: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    data: list[str] = Field(
        default_factory=lambda: ["c4", "technical"],
        description="training text: calibration sources, files, hf:..., or self (sampled from the dense model); "
        "never the evaluation text")
    n_tokens: int | dict[str, int | None] | None = Field(
        None, description="training text in all (split evenly between sources), or tokens per source "
        "({self: 262144}: a source left out or null gives every whole window); null = every whole window of each "
        "source (self needs a number)")
    sample_batch: int = Field(
        8, ge=1, description="for data 'self': sequences sampled at once (64 samples several times as many tokens "
        "a second as 8 on a CPU; a different batch samples different text from the same seed). Sampling runs at "
        "`precision` too")
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float | None = Field(None, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="over the budget: the schedule follows the larger of the spent fractions of "
        "max_tokens and max_minutes, so a time budget gets a full cosine too")
    warmup: float = Field(0.05, ge=0, lt=1, description="linear warm-up over this fraction of the budget")
    warmup_steps: int = Field(
        0, ge=0, description="besides, the first N optimizer steps take 1/N, 2/N, ... of the scheduled rate: a "
        "budget of few steps has less than one step of warm-up, and AdamW's first steps move every weight by about "
        "the full rate (Gemma 3 at lr 3e-4 and 8 steps: training KL 1.4 -> 9.2 after the first)")
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="precision of the forward and backward matrix products of student and teacher "
        "(autocast; weights, gradients, optimizer state and losses stay float32). bfloat16 trains two to three times as "
        "many tokens per second on CPUs with AMX or AVX512-BF16 and can be slower on CPUs without them")
    max_minutes: float | None = Field(15.0, gt=0, description="training time budget (the teacher's time included)")
    max_tokens: int | None = Field(None, gt=0, description="training token budget (input tokens)")
    temperature: float = Field(1.0, gt=0, description="of the logits KL (the loss is scaled by T^2)")
    kl_weight: float = Field(1.0, ge=0, description="KL(teacher || student) on the next-token distributions")
    lm_weight: float = Field(0.0, ge=0, description="next-token cross-entropy on the training text")
    mlp_weight: float = Field(0.0, ge=0, description="relative MSE of every layer's MLP output to the teacher's")
    network_weight: float = Field(
        0.0, ge=0, description="relative MSE of functional-network activity (mean activation of each network's "
        "kept members) to the teacher's; needs discovered networks")
    network_run: int = Field(0, ge=0, description="which discovery run's networks the network loss uses")
    teacher_topk: int | None = Field(
        None, gt=0, description="cache the teacher's top-k log-probabilities once per training sequence instead "
        "of running the teacher every step (KL over the top k plus the rest as one bucket)")
    checkpoint_every: int | None = Field(None, gt=0, description="optimizer steps between checkpoints; a run "
                                         "started again resumes from the latest one")
    checkpoint_dir: str | None = Field(None, description="default: <cache>/recover/<fingerprint of the run>")
    keep_checkpoints: bool = Field(False, description="keep the checkpoint directory after training finished")
    seed: int = 0

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("needs at least one module name or group")
        known = (*GROUPS, *PROJECTIONS)
        for name in v:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                raise ValueError(f"unknown target module {name!r}{hint} (known: {', '.join(known)})")
        return list(dict.fromkeys(v))

    @field_validator("data")
    @classmethod
    def _not_evaluation_text(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one text source")
        if EVALUATION_TEXT in v:
            raise ValueError(f"{EVALUATION_TEXT!r} is the evaluation text; training on it would measure "
                             "memorisation. Use calibration text (c4, technical, code, wiki) or self")
        if len(set(v)) != len(v):
            raise ValueError("a source is listed twice")
        return v

    @model_validator(mode="after")
    def _resolve(self) -> RecoverConfig:
        set_ = self.model_fields_set
        if self.method == "full":
            given = [k for k in LORA_ONLY if k in set_]
            if given:
                raise ValueError(f"{', '.join(given)}: LoRA options, but method is 'full'")
        if self.lr is None:  # resolved here, so the saved recipe says what was used
            self.__dict__["lr"] = DEFAULT_LR[self.method]
        if self.target_modules is None:
            self.__dict__["target_modules"] = list(DEFAULT_TARGETS[self.method])
        if self.max_tokens is not None and "max_minutes" not in set_:
            self.__dict__["max_minutes"] = None
        if self.max_minutes is None and self.max_tokens is None:
            raise ValueError("give a budget: max_minutes or max_tokens (or both; training stops at the first)")
        if self.kl_weight + self.lm_weight + self.mlp_weight + self.network_weight == 0:
            raise ValueError("every loss weight is 0: nothing to train on")
        if self.teacher_topk is not None and (self.mlp_weight > 0 or self.network_weight > 0):
            raise ValueError("teacher_topk caches only logits; the MLP and network losses need the teacher's "
                             "activations every step (set teacher_topk: null)")
        if isinstance(self.n_tokens, dict):
            extra = sorted(set(self.n_tokens) - set(self.data))
            if extra:
                raise ValueError(f"n_tokens names {', '.join(extra)}, which data does not list")
            bad = [k for k, v in self.n_tokens.items() if v is not None and v <= 0]
            if bad:
                raise ValueError(f"n_tokens of {', '.join(bad)} must be > 0")
        elif self.n_tokens is not None and self.n_tokens <= 0:
            raise ValueError("n_tokens must be > 0")
        if "self" in self.data and self.tokens_of("self") is None:
            raise ValueError("data 'self' is sampled from the dense model: give n_tokens (how much to sample)")
        if self.checkpoint_dir is not None and self.checkpoint_every is None:
            raise ValueError("checkpoint_dir is set but checkpoint_every is not: no checkpoint would be written")
        return self

    def tokens_of(self, source: str) -> int | None:
        """Tokens asked of ``source`` (None: every whole window of it)."""
        if isinstance(self.n_tokens, dict):
            return self.n_tokens.get(source)
        return None if self.n_tokens is None else -(-self.n_tokens // len(self.data))

    @property
    def micro_tokens(self) -> int:
        """Input tokens of one micro-batch."""
        return self.batch_size * self.seq_len
