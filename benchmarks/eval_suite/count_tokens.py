"""Work of the suite in tokens: what lm-eval's loop feeds the model vs the packed engine (context once per question).

    python benchmarks/eval_suite/count_tokens.py [--model smollm2-135m] [--blimp-per-paradigm 100]

Only tokenises (no model forward), so it is cheap; divide by a measured forward throughput (tokens/s) to
estimate the suite's running time on a machine.
"""

from __future__ import annotations

import argparse
import json

from run_suite import SUITE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blimp-per-paradigm", type=int, default=100)
    args = ap.parse_args()
    from lm_eval.tasks import TaskManager, get_task_dict

    from fbnprune.evaluate.tasks import prepare_offline_tasks
    from fbnprune.models import load_model

    tok = load_model(args.model).tokenizer
    prep = prepare_offline_tasks(SUITE, blimp_per_paradigm=args.blimp_per_paradigm)
    tm = TaskManager(include_path=str(prep.include_path), include_defaults=False)
    names = [n for n in SUITE if n != "blimp"] + [n for n in prep.info if n.startswith("blimp_")]
    tdict = get_task_dict(names, tm)
    rows, tot = {}, {"requests": 0, "hflm_tokens": 0, "packed_tokens": 0}
    prefix = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    for name, task in tdict.items():
        task.build_all_requests(limit=None, rank=0, world_size=1)
        ctxs: dict[str, int] = {}
        one_token_ctx: set[str] = set()  # lm-eval's logits cache: one-token continuations share one forward
        hflm = packed = 0
        for inst in task.instances:
            ctx, cont = inst.arguments
            c = tok(ctx, add_special_tokens=False)["input_ids"] if ctx else prefix
            w = tok(ctx + cont, add_special_tokens=False)["input_ids"] if ctx else tok(cont)["input_ids"]
            n_cont = max(1, len(w) - (len(c) if ctx else 0))
            if not (n_cont == 1 and ctx in one_token_ctx):
                hflm += len(c) + n_cont - 1
            if n_cont == 1:
                one_token_ctx.add(ctx)
            if ctx not in ctxs:
                ctxs[ctx] = len(c)
                packed += len(c)
            packed += n_cont - 1
        key = "blimp" if name.startswith("blimp_") else name
        r = rows.setdefault(key, {"requests": 0, "hflm_tokens": 0, "packed_tokens": 0})
        r["requests"] += len(task.instances)
        r["hflm_tokens"] += hflm
        r["packed_tokens"] += packed
        for k, v in (("requests", len(task.instances)), ("hflm_tokens", hflm), ("packed_tokens", packed)):
            tot[k] += v
    print(json.dumps({"per_task": rows, "total": tot}, indent=2))


if __name__ == "__main__":
    main()
