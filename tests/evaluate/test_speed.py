"""Paired generation speed: dense and pruned timed in alternation, CPU time beside wall time, a busy machine voids
the ratio; fake models and clocks make every number exact."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchEncoding

from fbnprune.evaluate.report import retention_report, to_markdown
from fbnprune.evaluate.speed import MIN_CPU_SHARE, busy_reason, paired_generation_speed
from tests.evaluate.helpers import md_tables, number


class Tok:
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, return_tensors=None):
        return BatchEncoding({"input_ids": torch.tensor([[2, 3, 4, 5, 6]]),
                              "attention_mask": torch.ones(1, 5, dtype=torch.long)})


class Clock:
    """Wall, process-CPU and thread-CPU clocks that a fake model advances; ``load`` scales wall time only (time
    lost to other work)."""

    def __init__(self, threads: int):
        self.wall = self.cpu = self.thread = 0.0
        self.threads = threads
        self.load = 1.0


class FakeModel:
    """Generates ``max_new_tokens`` tokens in ``seconds`` of CPU work per call, logging each call."""

    def __init__(self, name: str, seconds: float, clock: Clock, log: list[str]):
        self.name, self.seconds, self.clock, self.log = name, seconds, clock, log
        self.training = False
        self._p = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        return iter([self._p])

    def eval(self):
        return self

    def train(self, mode=True):
        self.training = mode
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        self.log.append(f"{self.name}:{max_new_tokens}")
        self.clock.wall += self.seconds * self.clock.load
        self.clock.cpu += self.seconds * self.clock.threads
        self.clock.thread += self.seconds
        return torch.zeros(1, input_ids.shape[1] + max_new_tokens, dtype=torch.long)


def measure(dense_s=0.2, pruned_s=0.1, load=(0.5, 0.5, 0.5), cores=4, slow_down=None, repeats=4):
    threads = torch.get_num_threads()
    clock, log = Clock(threads), []
    dense, pruned = FakeModel("dense", dense_s, clock, log), FakeModel("pruned", pruned_s, clock, log)
    if slow_down:  # other work starts after the first timed call: every later call takes `slow_down` times as long
        inner = dense.generate

        def generate(*a, **k):
            out = inner(*a, **k)
            if k["max_new_tokens"] == 10:
                clock.load = slow_down
            return out

        dense.generate = generate
    res = paired_generation_speed(dense, pruned, Tok(), new_tokens=10, repeats=repeats,
                                  wall=lambda: clock.wall, cpu=lambda: clock.cpu, thread_cpu=lambda: clock.thread,
                                  loadavg=lambda: tuple(x + threads for x in load), cores=cores)
    return res, log, threads


def test_models_alternate_after_both_warm_up():
    res, log, _ = measure()
    assert log == ["dense:8", "pruned:8",  # untimed warm-ups
                   "dense:10", "pruned:10", "pruned:10", "dense:10", "dense:10", "pruned:10", "pruned:10", "dense:10"]
    assert res["pruned"]["vs_dense"]["order"] == [x.split(":")[0] for x in log[2:]]
    d, p = res["dense"], res["pruned"]
    assert (d["tokens_per_s"], p["tokens_per_s"]) == (50.0, 100.0)  # 10 tokens in 0.2 s and 0.1 s
    assert d["tokens_per_cpu_s"] == pytest.approx(50.0 / torch.get_num_threads(), abs=0.01)
    assert d["wall_s"] == [0.2] * 4 and d["new_tokens"] == 10 and d["prompt_tokens"] == 5
    vs = p["vs_dense"]
    assert vs["speedup"] == vs["wall_ratio"] == vs["cpu_speedup"] == 2.0
    assert not vs["busy"] and vs["warning"] is None and vs["cpu_share"] == 1.0


def test_a_load_change_during_the_measurement_leaves_the_ratio():
    """Other work slows every call after the first timed one by 1.5x (not enough to void the measurement): the
    ratio is still the models' own 2.0, where timing one model before the other would have given 1.33."""
    res, _, _ = measure(slow_down=1.5, cores=64)
    vs = res["pruned"]["vs_dense"]
    assert vs["speedup"] == 2.0 and vs["cpu_speedup"] == 2.0 and not vs["busy"]
    assert res["dense"]["wall_s"][0] == pytest.approx(0.2) and res["dense"]["wall_s"][1] == pytest.approx(0.3)


def test_busy_machine_voids_the_ratio_and_says_why():
    # other work: load average 3 above this process's threads on 4 cores
    res, _, threads = measure(load=(3.5, 1.0, 1.0), cores=4)
    vs = res["pruned"]["vs_dense"]
    assert vs["busy"] and vs["speedup"] is None and vs["wall_ratio"] == 2.0
    assert vs["warning"].startswith(f"1-minute load average {3.5 + threads:.2f} on 4 cores")
    # the load average is quiet but the measurement itself lost most of its CPU time to other work
    res, _, _ = measure(slow_down=4.0, cores=64)
    vs = res["pruned"]["vs_dense"]
    assert vs["busy"] and vs["cpu_share"] < MIN_CPU_SHARE and "generating thread ran on a core" in vs["warning"]


def test_busy_reason_thresholds():
    assert busy_reason(load1=2.0, cores=2, threads=2, cpu_share=0.9) is None  # this process alone
    assert busy_reason(load1=3.0, cores=2, threads=2, cpu_share=0.9) is None  # one other single-threaded job
    assert busy_reason(load1=3.1, cores=2, threads=2, cpu_share=0.9) is not None
    assert busy_reason(load1=0.0, cores=2, threads=2, cpu_share=MIN_CPU_SHARE) is None
    assert busy_reason(load1=0.0, cores=2, threads=2, cpu_share=MIN_CPU_SHARE - 0.01) is not None
    assert busy_reason(load1=0.0, cores=2, threads=2, cpu_share=None) is None  # not on a CPU: no share


def stats(gen):
    return {"params": 100, "param_bytes": 400, "generation": gen}


def test_report_shows_paired_speed_and_voids_it_when_busy():
    res, _, _ = measure()
    rep = retention_report({"tasks": {}}, {"tasks": {}}, stats(res["dense"]), stats(res["pruned"]))
    assert rep["models"]["speedup"] == 2.0 and rep["warnings"] == []
    md = to_markdown(rep)
    models = md_tables(md)[0]
    assert [number(c) for c in models["dense"][2:]] == [50.0, res["dense"]["tokens_per_cpu_s"]]
    assert [number(c) for c in models["pruned / dense"][2:]] == [2.0, 2.0]
    assert "timed in alternation" in md and "Warning" not in md

    res, _, _ = measure(load=(6.0, 6.0, 6.0), cores=2)
    rep = retention_report({"tasks": {}}, {"tasks": {}}, stats(res["dense"]), stats(res["pruned"]))
    assert rep["models"]["speedup"] is None and rep["models"]["cpu_speedup"] is None
    assert len(rep["warnings"]) == 1 and "speed ratio is not a result" in rep["warnings"][0]
    md = to_markdown(rep)
    assert md.startswith("**Warning**: generation speed: 1-minute load average")
    models = md_tables(md)[0]
    assert models["pruned / dense"][2:] == ["not a result (machine busy)"] * 2
    assert number(models["pruned"][2]) == 100.0  # each model's own speed is still shown, as measured


def test_real_generate_in_alternation(tiny_llama):
    """The same protocol on a real (tiny) model: exactly the requested tokens, times for every repeat."""
    res = paired_generation_speed(tiny_llama, tiny_llama, Tok(), new_tokens=4, repeats=2)
    for name in ("dense", "pruned"):
        g = res[name]
        assert g["new_tokens"] == 4 and len(g["wall_s"]) == len(g["cpu_s"]) == 2 and g["tokens_per_s"] > 0
    vs = res["pruned"]["vs_dense"]
    assert vs["order"] == ["dense", "pruned", "pruned", "dense"] and len(vs["load"]["before"]) == 3
