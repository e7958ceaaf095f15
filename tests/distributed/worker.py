"""What each rank of a distributed test runs: ``python -m tests.distributed.worker CASE ...``.

* ``values ENV_DIR OUT``: the pipeline's pieces one by one on the tiny model of ``ENV_DIR`` (activation
  statistics, Grams, scores of every calibration-based scorer, networks, protected layers, a refit-compensated
  plan, perplexity and retention), saved to ``OUT/rank<r>.pt``; :func:`values` in one process is the reference.
* ``tasks ENV_DIR OUT``: :func:`tasks` (lm-eval), saved to ``OUT/rank<r>.json``.
* ``cli ARGS...``: ``fbnprune.cli.main(ARGS)``. ``FBNPRUNE_TEST_FAIL=<rank>:<function>`` makes that function of
  ``fbnprune.run`` raise on that rank.

With ``FBNPRUNE_TEST_AUDIT=<dir>``, every rank but 0 records each file it opens for writing, creates, renames or
removes under ``<dir>`` (Python's audit events; a file written by native code inside a directory it did not
create is not seen) and prints the list as ``WRITES: [...]`` at the end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def values(env_dir: Path) -> dict[str, Any]:
    from fbnprune import distributed as dist
    from fbnprune.arch import get_adapter
    from fbnprune.collect import collect, make_sequences
    from fbnprune.discover import DiscoverConfig
    from fbnprune.evaluate import next_token_agreement, perplexity
    from fbnprune.evaluate.ppl import token_stream
    from fbnprune.models import load_model
    from fbnprune.prune import ScoreContext, apply_plan_, compensate_, make_plan, score_neurons
    from fbnprune.prune.gram import augmented_gram, clear_gram_cache
    from fbnprune.prune.protect import auto_protected_layers

    torch.manual_seed(0)
    lm = load_model(str(env_dir / "model"))
    model, tok = lm.model, lm.tokenizer
    calib = dist.on_main(lambda: make_sequences(tok, str(env_dir / "calib.txt"), n_tokens=512, seq_len=32),
                         what="calibration")
    # 16 sequences in batches of 3: six batches, three per rank, the last one short
    store = collect(model, calib, model_info=lm.info, batch_size=3, keep_activations=True, drop_first=1)
    adapter = get_adapter(model)
    n_layers = len(adapter.mlps(model))
    clear_gram_cache()
    out: dict[str, Any] = {
        "rows": torch.from_numpy(store.rows()),
        "acts": [torch.from_numpy(store.layer(i).copy()) for i in range(n_layers)],
        "stats": [(store.stats(i).count, store.stats(i).sum, store.stats(i).sumsq, store.stats(i).absmax)
                  for i in range(n_layers)],
        "gram": [augmented_gram(store, i, chunk_rows=64).clone() for i in range(n_layers)],
    }
    disc = DiscoverConfig(n_components=8, n_restarts=2, block_texts=None, block_rows=128)
    ctx = ScoreContext(model=model, adapter=adapter, store=store, sequences=calib.sequences, sparsity=0.25,
                       discover=disc, progress=False, taylor_max_sequences=10, taylor_batch_size=2)
    out["scores"] = {m: score_neurons(m, ctx) for m in ("wanda_sp", "flap", "obs", "taylor", "fbn")}
    from fbnprune.prune.networks import scoring_networks

    nets = scoring_networks(ctx, "fbn")
    out["networks"] = dict(nets._t)
    out["networks_summary"] = {k: v for k, v in nets.summary.items() if k not in ("timing_s", "machine", "seconds")}
    out["protected"] = auto_protected_layers(model, calib.sequences, progress=False)
    plan = make_plan(out["scores"]["obs"], sparsity=0.25)
    out["keep"] = [k.clone() for k in plan.keep]
    stream = token_stream(tok, str(env_dir / "eval.txt"), 512)
    out["ppl_dense"] = perplexity(model, stream, seq_len=32, batch_size=3, progress=False)
    import copy

    pruned = copy.deepcopy(model)
    compensate_(pruned, plan, store, "refit", ridge=1e-3, progress=False)
    apply_plan_(pruned, plan, mode="slice")
    out["pruned_down"] = [adapter.down_weight(m).detach().clone() for m in adapter.mlps(pruned)]
    out["ppl_pruned"] = perplexity(pruned, stream, seq_len=32, batch_size=3, progress=False)
    held = make_sequences(tok, str(env_dir / "eval.txt"), n_tokens=160, seq_len=32)
    out["retention"] = next_token_agreement(model, pruned, held.sequences, batch_size=2, progress=False)
    from fbnprune.paths import cache_dir

    out.update(sequential(lm, calib, tmp=cache_dir() / "sequential"))
    out["world"] = dist.world()
    return out


def sequential(lm: Any, calib: Any, tmp: Path) -> dict[str, Any]:
    """Sequential pruning of a copy of the model: obs with a dense-target re-fit, and fbn (networks per layer)."""
    import copy

    from fbnprune.arch import get_adapter
    from fbnprune.prune.sequential import InMemoryLayers, SequentialOptions, prune_sequential

    out = {}
    for case, kw in (("obs", {"compensate": "refit"}),
                     ("fbn", {"discover": {"n_components": 8, "n_restarts": 2, "block_texts": None,
                                           "block_rows": 128}})):
        model = copy.deepcopy(lm.model)
        adapter = get_adapter(model)
        opts = SequentialOptions(method=case, sparsity=0.25, batch_size=3, progress=False, **kw)
        res = prune_sequential(InMemoryLayers(model, adapter), calib.sequences, opts, tmp / case,
                               doc_ids=calib.doc_ids)
        out[f"seq_{case}"] = {"keep": [k.clone() for k in res.plan.keep], "report": res.report(),
                              "down": [adapter.down_weight(m).detach().clone() for m in adapter.mlps(model)]}
    out["seq_checkpoint"] = checkpoint_layers(Path(lm.source), calib, tmp)
    return out


def checkpoint_layers(model_dir: Path, calib: Any, tmp: Path) -> dict[str, Any]:
    """Layer-by-layer loading from the safetensors checkpoint (the 70B path of docs/scale.md): rank 0 writes the
    pruned checkpoint, every rank reads it back."""
    from safetensors.torch import load_file

    from fbnprune import distributed as dist
    from fbnprune.prune.sequential import CheckpointLayers, SequentialOptions, prune_sequential

    out_dir = tmp / "checkpoint"
    layers = CheckpointLayers(model_dir, out_dir)
    opts = SequentialOptions(method="obs", sparsity=0.25, compensate="refit", batch_size=3, progress=False)
    res = prune_sequential(layers, calib.sequences, opts, tmp / "checkpoint-work")
    if dist.is_main():
        layers.write_checkpoint(res.plan)
    dist.barrier("checkpoint written")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out_dir.glob("model-layer-*.safetensors")):
        tensors.update(load_file(str(f)))
    dist.barrier("checkpoint read")
    if dist.is_main():
        import shutil

        shutil.rmtree(out_dir)
    return {"keep": [k.clone() for k in res.plan.keep], "tensors": tensors}


def tasks(env_dir: Path) -> dict[str, Any]:
    """Two offline lm-eval tasks (first 21 items) with both engines, on the tiny model (needs the data directory)."""
    from fbnprune.evaluate.harness import evaluate_tasks
    from fbnprune.models import load_model

    lm = load_model(str(env_dir / "model"))
    out = {}
    for engine in ("packed", "hflm"):
        res = evaluate_tasks(lm.model, lm.tokenizer, ["copa", "arc_easy"], limit=21, batch_size=4, engine=engine,
                             progress=False)
        out[engine] = res["tasks"]
    return out


def _fail(spec: str) -> None:
    """Make ``fbnprune.run.<function>`` raise on one rank (``<rank>:<function>``)."""
    import fbnprune.run as run_mod
    from fbnprune import distributed as dist

    who, name = spec.split(":")
    real = getattr(run_mod, name)

    def broken(*a: Any, **kw: Any) -> Any:
        if dist.rank() == int(who):
            raise RuntimeError(f"injected failure in {name}")
        return real(*a, **kw)

    setattr(run_mod, name, broken)


def _audit(root: str) -> list[str]:
    """Record write-like file events under ``root`` (on ranks other than 0, which must write nothing)."""
    seen: list[str] = []
    root = os.path.realpath(root)
    events = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move", "os.replace",
              "os.symlink", "os.truncate"}

    def under(p: Any) -> bool:
        try:
            return os.path.realpath(os.fsdecode(p)).startswith(root)
        except (TypeError, ValueError):
            return False

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if int(os.environ.get("RANK", "0")) == 0:
            return
        if event == "open" and len(args) >= 2 and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
            if under(args[0]):
                seen.append(f"open {args[0]} {args[1]}")
        elif event == "open" and len(args) >= 3 and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR):
            if under(args[0]):
                seen.append(f"open {args[0]} flags={args[2]}")
        elif event in events and args and under(args[0]):
            seen.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    return seen


def main(argv: list[str]) -> int:
    case, rest = argv[0], argv[1:]
    seen = _audit(os.environ["FBNPRUNE_TEST_AUDIT"]) if os.environ.get("FBNPRUNE_TEST_AUDIT") else None
    if case == "values":
        from fbnprune import distributed as dist

        with dist.session("cpu"):
            got = values(Path(rest[0]))
            torch.save(got, Path(rest[1]) / f"rank{dist.rank()}.pt")  # outside the audited directory
        code = 0
    elif case == "tasks":
        from fbnprune import distributed as dist

        with dist.session("cpu"):
            got = tasks(Path(rest[0]))
            (Path(rest[1]) / f"rank{dist.rank()}.json").write_text(json.dumps(got))
        code = 0
    elif case == "cli":
        if os.environ.get("FBNPRUNE_TEST_FAIL"):
            _fail(os.environ["FBNPRUNE_TEST_FAIL"])
        from fbnprune.cli import main as cli_main

        code = cli_main(rest)
    else:
        raise SystemExit(f"unknown case {case!r}")
    if seen is not None and int(os.environ.get("RANK", "0")) != 0:
        print("WRITES: " + json.dumps(seen), flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
