"""Command line: ``python -m fbnprune {run,collect,discover,prune,evaluate,export,analyze,validate,recipes,cp}``.

Exit codes: 0 ok, 2 usage or recipe/input error (one message, no traceback), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from fbnprune.errors import PeerFailure, UserError

EPILOG = """examples:
  python -m fbnprune recipes                          list bundled recipes
  python -m fbnprune run recipes/quickstart.yaml      run a recipe (file or bundled name)
  python -m fbnprune run quickstart prune.sparsity=0.3 output_dir=outputs/q30
  python -m fbnprune run quickstart --overwrite       run again into the existing outputs/quickstart
  python -m fbnprune validate my.yaml                 check a recipe, report every error
  python -m fbnprune cp quickstart ./mine.yaml        copy a bundled recipe to edit
  python -m fbnprune analyze analyze-smollm2-135m    masking / keep-only / recurrence figures
  python -m fbnprune discover quickstart prune.method=fbn collect.keep_activations=true
                                                      stage commands: collect, discover, prune, evaluate, export
  torchrun --nproc_per_node 2 -m fbnprune run quickstart
  accelerate launch --num_processes 2 -m fbnprune run quickstart
                                                      one run in several processes (docs/scale.md)
"""


# A flag, not a recipe field: whether to replace the last run's results is a decision about this invocation,
# and a recipe that carried it would replace them on every later run too.
OVERWRITE_HELP = "replace the output directory when it holds an earlier run's output (otherwise an error)"


def _cmd_run(args: argparse.Namespace) -> int:
    from fbnprune import distributed as dist
    from fbnprune.recipe import load_recipe
    from fbnprune.run import run

    recipe = load_recipe(args.recipe, args.overrides)
    # under torchrun / accelerate launch: join the process group for the run (nothing happens in one process)
    with dist.session(recipe.model.device):
        report = run(recipe, output_dir=args.output, until=args.until, evaluate=args.evaluate,
                     overwrite=args.overwrite)
        if not dist.is_main():
            return 0
    if args.until == "collect" and "calibration" in report:
        print(f"activations: {report['calibration']['store']}")
    if args.until == "discover" and "networks" in report:
        print(f"networks: {report['networks']['path']}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from fbnprune.analyze import analyze
    from fbnprune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UserError("analyze runs in one process: start it without torchrun / accelerate launch")
    analyze(recipe, output_dir=args.output, overwrite=args.overwrite)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from fbnprune.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok ({recipe.name}: {recipe.model.source}, {recipe.prune.method} "
          f"{'sparsity ' + str(recipe.prune.sparsity) if recipe.prune.sparsity is not None else ''})")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    import yaml

    from fbnprune.recipe import bundled_recipes

    rows = []
    for name, path in bundled_recipes().items():
        try:
            desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
        except yaml.YAMLError:
            desc = "(unreadable)"
        rows.append((name, str(desc).strip().splitlines()[0] if desc else ""))
    width = max((len(n) for n, _ in rows), default=0)
    for n, d in rows:
        print(f"{n:<{width}}  {d}")
    return 0


def _cmd_cp(args: argparse.Namespace) -> int:
    from fbnprune.recipe import find_recipe

    src = find_recipe(args.name)
    dest = Path(args.dest)
    if dest.is_dir():
        dest = dest / src.name
    if dest.exists() and not args.force:
        raise UserError(f"{dest} exists (use --force to overwrite)")
    shutil.copyfile(src, dest)
    print(f"copied {src.name} -> {dest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fbnprune",
        description="Prune LLM MLP neurons guided by functional networks; evaluate and export slim checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from fbnprune import __version__

    p.add_argument("--version", action="version", version=f"fbnprune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    stage_help = {
        "run": "run a recipe end to end",
        "collect": "only capture calibration activations (cached for later stages)",
        "discover": "collect, then find functional networks (both cached)",
        "prune": "collect/discover (cached), score and write the keep plan",
        "evaluate": "prune and evaluate dense vs pruned, without exporting",
        "export": "prune and export the slim checkpoint, without evaluating",
    }
    for verb, help_text in stage_help.items():
        r = sub.add_parser(verb, help=help_text)
        r.add_argument("recipe", help="recipe file or bundled recipe name")
        r.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe fields")
        r.add_argument("--output", "-o", help="output directory (default: recipe's output_dir or outputs/<name>)")
        r.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
        r.set_defaults(func=_cmd_run, until="export" if verb == "run" else verb, evaluate=verb != "export")

    a = sub.add_parser("analyze", help="test the functional-network claims on a model (recurrence, masking, "
                       "keep-only, amplification) and draw the figures")
    a.add_argument("recipe", help="recipe file or bundled name (its model, collect, discover and analyze sections)")
    a.add_argument("overrides", nargs="*", metavar="key.path=value")
    a.add_argument("--output", "-o", help="output directory (default: recipe's output_dir or outputs/<name>)")
    a.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    a.set_defaults(func=_cmd_analyze)

    v = sub.add_parser("validate", help="validate a recipe and report every error")
    v.add_argument("recipe")
    v.add_argument("overrides", nargs="*", metavar="key.path=value")
    v.set_defaults(func=_cmd_validate)

    ls = sub.add_parser("recipes", help="list bundled recipes")
    ls.set_defaults(func=_cmd_recipes)

    cp = sub.add_parser("cp", help="copy a bundled recipe for editing")
    cp.add_argument("name")
    cp.add_argument("dest")
    cp.add_argument("--force", action="store_true")
    cp.set_defaults(func=_cmd_cp)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse exits 2 on usage errors
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"fbnprune: error: {e}", file=sys.stderr)
        return 2
    except PeerFailure as e:  # another process of a torchrun / accelerate launch run failed; its output says why
        print(f"fbnprune: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `fbnprune recipes | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("fbnprune: interrupted", file=sys.stderr)
        return 130
