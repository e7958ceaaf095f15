"""Data-parallel runs on CPU (gloo, two processes, tiny model) against the single-process run.

Every multi-process test starts its ranks with a hard time limit and a short collective timeout
(:mod:`tests.distributed.helpers`), so a hung collective fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fbnprune import distributed as dist
from tests.distributed.helpers import COLLECTIVE_TIMEOUT_S, REPO, free_port, launch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def recipe(env: Path, tmp_path: Path, **prune) -> Path:
    data = {
        "name": "tiny",
        "model": {"source": str(env / "model")},
        "collect": {"source": str(env / "calib.txt"), "n_tokens": 512, "seq_len": 32, "keep_activations": True,
                    "batch_size": 3},
        "prune": {"method": "wanda_sp", "sparsity": 0.25, **prune},
        "evaluate": {"perplexity": [{"source": str(env / "eval.txt"), "seq_len": 32, "max_tokens": 512,
                                     "batch_size": 3}],
                     "retention": {"source": str(env / "eval.txt"), "n_tokens": 128, "seq_len": 32}},
    }
    if prune.get("method") == "fbn":
        data["discover"] = {"n_components": 8, "n_restarts": 2, "block_texts": None, "block_rows": 128}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def writes(stdout: str) -> list[list[str]]:
    """The ``WRITES: [...]`` records of the test worker (the launcher may interleave them with other output)."""
    dec = json.JSONDecoder()
    return [dec.raw_decode(stdout, m.end())[0] for m in re.finditer(r"WRITES: ", stdout)]


def ok(ranks) -> None:
    for r in ranks:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------------ one process
def test_helpers_are_no_ops_in_one_process():
    assert not dist.active() and dist.rank() == 0 and dist.world() == 1 and dist.is_main()
    t = torch.arange(3.0)
    assert dist.all_reduce_(t) is t and t.tolist() == [0, 1, 2]
    assert dist.shard(5) == [0, 1, 2, 3, 4] and dist.owner(3) == 0
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}] and dist.broadcast_object(7) == 7
    assert dist.gather_rows(t[:, None], [3])[0].shape == (3, 1)
    assert dist.on_main(lambda: 5, "x") == 5
    assert dist.ordered_sum({0: (0.1,), 1: (0.2,), 2: (0.3,)}, 3) == [0.1 + 0.2 + 0.3]
    with pytest.raises(RuntimeError, match="computed by no rank"):
        dist.ordered_sum({0: (1.0,)}, 2)
    with dist.session("cpu") as started:  # no launcher variables: nothing is started
        assert not started and not dist.active()
    dist.barrier()
    dist.check_shared_dir(Path("/nonexistent"))  # nothing to check in one process


def test_world_size_without_the_other_variables_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    from fbnprune.errors import UserError

    with pytest.raises(UserError, match="torchrun or accelerate launch"):
        dist.init("cpu")


# ------------------------------------------------------------------------------------------------ two processes
def _close(a, b, path="", rtol=1e-6, atol=1e-9):
    """``a == b`` for exact types; floats to ``rtol`` / ``atol`` (sums reduced over ranks in another order, some of
    them of float32 products)."""
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, path
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol, msg=path)
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            if k not in ("seconds", "store"):  # wall time; the cache directory of each run
                _close(a[k], b[k], f"{path}.{k}", rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]", rtol, atol)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=rtol, abs=atol), path
    else:
        assert a == b, path


def test_every_statistic_score_and_network_equals_one_process(tiny_env, tmp_path, monkeypatch):
    """Store (rows, activations, statistics), Grams, scores of wanda_sp/flap/obs/taylor/fbn, the networks, the
    protected layers, the keep plan, the re-fit weights, perplexity, retention, and sequential pruning (obs with a
    dense-target re-fit, fbn with per-layer networks, and obs loading each layer from the checkpoint and writing the
    pruned one): two ranks, each rank against the single-process values."""
    from tests.distributed.worker import values

    out = tmp_path / "out"
    out.mkdir()
    ranks = launch(["-m", "tests.distributed.worker", "values", str(tiny_env), str(out)],
                   env={"FBNPRUNE_CACHE": str(tmp_path / "cache2"), "FBNPRUNE_TEST_AUDIT": str(tmp_path / "cache2")})
    ok(ranks)
    assert writes(ranks[1].stdout) == [[]]  # rank 1 created nothing in the caches; rank 0 wrote them
    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache1"))
    single = values(tiny_env)
    for r in range(2):
        got = torch.load(out / f"rank{r}.pt", weights_only=False)
        assert got.pop("world") == 2
        # exact where the pipeline promises it: rows, activations, keep plan, perplexity and retention sums
        assert torch.equal(got["rows"], single["rows"])
        assert all(torch.equal(a, b) for a, b in zip(got["acts"], single["acts"], strict=True))
        assert all(torch.equal(a, b) for a, b in zip(got["keep"], single["keep"], strict=True))
        assert got["ppl_dense"]["nll"] == single["ppl_dense"]["nll"]
        assert got["ppl_pruned"]["nll"] == single["ppl_pruned"]["nll"]
        assert got["retention"] == single["retention"]
        assert got["protected"] == single["protected"]
        for case in ("obs", "fbn", "checkpoint"):  # sequential: the same neurons in every layer
            assert all(torch.equal(a, b) for a, b in zip(got[f"seq_{case}"]["keep"], single[f"seq_{case}"]["keep"],
                                                         strict=True))
        # the rest to float tolerance: sums reduced over ranks in another order
        loose = ("seq_obs", "seq_checkpoint")
        _close({k: v for k, v in single.items() if k not in ("world", *loose)},
               {k: v for k, v in got.items() if k not in loose})
        # the dense-target re-fit solves with a cross-Gram of float32 products summed per rank: a ridge solve
        # carries their rounding (1e-7) into the weights at about 1e-5
        for k in loose:
            _close(single[k], got[k], k, rtol=1e-4, atol=1e-5)
    # the caches rank 0 wrote: one store, the networks of the parallel and the sequential fbn runs, no work
    # directory left and nothing half-written
    cache = tmp_path / "cache2"
    assert len(list((cache / "activations").iterdir())) == 1 and len(list((cache / "networks").iterdir())) == 3
    assert not list((cache / "sequential").iterdir()) and not list(cache.rglob(".*"))


@pytest.mark.slow  # ~25 s on 2 busy cores: two ranks importing lm-eval, then the single-process run
def test_lm_eval_tasks_in_two_processes_equal_one(tiny_env, tmp_path, monkeypatch):
    """lm-eval's evaluator shares each task's documents out over the ranks and gathers the metrics on rank 0; every
    rank returns rank 0's result, equal to the single-process one (packed engine and lm-eval's own loop)."""
    from fbnprune.paths import data_dir
    from tests.distributed.worker import tasks

    if data_dir() is None or not (data_dir() / "copa").is_dir():
        pytest.skip("data directory (../shared/data) not available")
    out = tmp_path / "out"
    out.mkdir()
    ok(launch(["-m", "tests.distributed.worker", "tasks", str(tiny_env), str(out)],
              env={"FBNPRUNE_CACHE": str(tmp_path / "cache2")}))
    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache1"))
    single = tasks(tiny_env)
    for r in range(2):
        got = json.loads((out / f"rank{r}.json").read_text())
        for engine, res in single.items():
            for task, entry in res.items():
                for metric, v in entry.items():
                    if isinstance(v, float):
                        assert got[engine][task][metric] == pytest.approx(v, rel=1e-9, abs=1e-12), (engine, task)
                    else:
                        assert got[engine][task][metric] == v, (engine, task, metric)


@pytest.mark.slow  # ~25 s each on 2 busy cores: the launcher and its agent, two ranks, then the single-process run
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_launched_cli_run_equals_one_process_and_only_rank_0_writes(tiny_env, tmp_path, launcher, monkeypatch):
    """``torchrun --nproc_per_node 2 -m fbnprune run`` and ``accelerate launch --multi_gpu --num_processes 2 -m
    fbnprune run`` (through the test worker, which records on rank 1 every file it creates): the outputs equal a
    single-process run's; rank 1 writes nothing."""
    import subprocess

    from fbnprune.cli import main
    from tests.distributed.helpers import base_env

    rf = recipe(tiny_env, tmp_path, method="fbn", compensate="refit")
    work = tmp_path / "w"
    work.mkdir()
    start = (["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
             if launcher == "torchrun" else
             ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())])
    cmd = [sys.executable, *start, "-m", "tests.distributed.worker", "cli", "run", str(rf), "-o", str(work / "out2")]
    env = base_env({"FBNPRUNE_CACHE": str(work / "cache"), "FBNPRUNE_TEST_AUDIT": str(tmp_path),
                    "HF_HOME": str(tmp_path / "hf")})  # no accelerate config file of the user's
    p = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert writes(p.stdout) == [[]]  # printed by rank 1 only (rank 0 is not audited), and empty
    assert p.stdout.count("[fbnprune] wrote") == 1
    monkeypatch.setenv("FBNPRUNE_CACHE", str(tmp_path / "cache1"))
    assert main(["run", str(rf), "-o", str(tmp_path / "out1")]) == 0
    two, one = work / "out2", tmp_path / "out1"
    assert sorted(x.name for x in two.iterdir()) == sorted(x.name for x in one.iterdir())
    assert (two / "keep_plan.json").read_text() == (one / "keep_plan.json").read_text()
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    for label in ("dense", "pruned"):
        for k, v in r1["results"][label].items():
            if k.startswith("ppl_"):
                assert r2["results"][label][k]["nll"] == v["nll"]
    assert r2["results"]["pruned"]["retention"] == r1["results"]["pruned"]["retention"]
    assert r2["distributed"] == {"processes": 2, "backend": "gloo", "launcher": launcher}
    from safetensors.torch import load_file

    w1, w2 = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    assert set(w1) == set(w2) and all(torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-7) for k in w1)


@pytest.mark.parametrize("failing", [1, 0])
def test_a_failing_rank_fails_the_run_with_its_message_and_writes_nothing(tiny_env, tmp_path, failing):
    """One rank raises in the prune stage while the other goes on: both exit non-zero within seconds (not the
    collective timeout), each names the failing rank and its error, and no output (or temporary) directory
    exists."""
    rf = recipe(tiny_env, tmp_path)
    t0 = time.monotonic()
    ranks = launch(["-m", "tests.distributed.worker", "cli", "run", str(rf), "-o", str(tmp_path / "out")],
                   env={"FBNPRUNE_CACHE": str(tmp_path / "cache"), "FBNPRUNE_TEST_FAIL": f"{failing}:prune_stage"})
    elapsed = time.monotonic() - t0
    assert elapsed < COLLECTIVE_TIMEOUT_S, "the other rank waited for the collective timeout"
    assert all(r.returncode != 0 for r in ranks), [r.returncode for r in ranks]
    bad, other = ranks[failing], ranks[1 - failing]
    assert "RuntimeError: injected failure in prune_stage" in bad.stderr
    assert other.returncode == 1 and f"fbnprune: error: rank {1 - failing} stopped in" in other.stderr
    named = f"rank {failing} (" in other.stderr and "failed: RuntimeError: injected failure in prune_stage" in other.stderr
    # the message travels through the key-value store, which rank 0 holds under a plain launcher: when rank 0 has
    # gone before the other rank reaches its next collective, that rank can only say rank 0 is gone
    assert named or (failing == 0 and "rank 0, which holds the run's key-value store, is gone" in other.stderr)
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def test_a_user_error_on_every_rank_is_reported_once_per_rank_with_exit_code_2(tiny_env, tmp_path):
    """A recipe multi-process runs do not support (recovery training) is refused by every rank, before any model
    loads."""
    rf = recipe(tiny_env, tmp_path)
    data = yaml.safe_load(rf.read_text())
    data["recover"] = {"data": [str(tiny_env / "calib.txt")], "seq_len": 32, "max_tokens": 512}
    rf.write_text(yaml.safe_dump(data))
    ranks = launch(["-m", "tests.distributed.worker", "cli", "run", str(rf), "-o", str(tmp_path / "out")],
                   env={"FBNPRUNE_CACHE": str(tmp_path / "cache")})
    assert [r.returncode for r in ranks] == [2, 2]
    assert all("recover (distillation) runs in one process" in r.stderr for r in ranks)
    assert not (tmp_path / "out").exists()
