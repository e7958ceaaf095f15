"""A run stopped by a crash and started again resumes from its latest checkpoint and ends exactly where an
uninterrupted run ends (CPU, one thread, token budget); another run's checkpoints are refused."""

from __future__ import annotations

import pytest
import torch

from fbnprune.errors import UserError
from fbnprune.recover import recover_
from tests.conftest import word_tokenizer
from tests.recover.helpers import config, env, pair


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return env(tmp_path_factory.mktemp("resume"))


class Crash(Exception):
    pass


def crash_at(step):
    def on_step(state):
        if state.step == step:
            raise Crash(f"simulated crash after step {step}")
    return on_step


@pytest.mark.parametrize("kw", [
    {"method": "lora", "dropout": 0.2, "grad_accum": 2},  # dropout: the RNG state must come back too
    {"method": "full", "teacher_topk": 8},  # the cached teacher is rebuilt with the same numbers
], ids=["lora-dropout", "full-topk"])
def test_resume_equals_an_uninterrupted_run(root, tmp_path, kw):
    settings = dict(lr=1e-2, max_tokens=9 * 4 * 32 * kw.get("grad_accum", 1), checkpoint_every=2, **kw)
    teacher, whole = pair()
    ref = recover_(teacher, whole, word_tokenizer(), config(root, checkpoint_dir=str(tmp_path / "a"), **settings),
                   progress=False)
    assert not (tmp_path / "a").exists()  # checkpoints are removed once training finished

    cfg = config(root, checkpoint_dir=str(tmp_path / "b"), **settings)
    _, crashed = pair()
    with pytest.raises(Crash):
        recover_(teacher, crashed, word_tokenizer(), cfg, progress=False, on_step=crash_at(5))
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["fingerprint.json", "step-00000004.pt"]

    _, resumed = pair()  # a new process would prune the same student again
    rec = recover_(teacher, resumed, word_tokenizer(), cfg, progress=False)
    assert rec["resumed_from_step"] == 4 and rec["steps"] == ref["steps"] == 9
    assert rec["curve"] == ref["curve"]
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    _, untrained = pair()
    assert not torch.equal(untrained.state_dict()["model.layers.0.mlp.down_proj.weight"],
                           b["model.layers.0.mlp.down_proj.weight"])  # the comparison is not trivially true


def test_checkpoints_of_another_run_are_refused(root, tmp_path):
    teacher, student = pair()
    cfg = config(root, lr=1e-2, checkpoint_every=1, checkpoint_dir=str(tmp_path / "c"))
    with pytest.raises(Crash):
        recover_(teacher, student, word_tokenizer(), cfg, progress=False, on_step=crash_at(2))
    _, fresh = pair()
    start = {k: v.clone() for k, v in fresh.state_dict().items()}
    steps = []
    with pytest.raises(UserError, match=r"holds checkpoints of another run \(different settings\)"):
        recover_(teacher, fresh, word_tokenizer(), config(root, lr=2e-2, checkpoint_every=1,
                                                          checkpoint_dir=str(tmp_path / "c")),
                 progress=False, on_step=steps.append)
    assert not steps and all(torch.equal(v, fresh.state_dict()[k]) for k, v in start.items())
