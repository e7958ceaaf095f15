"""Load recipes: YAML -> overrides (``key.path=value``, CLI > YAML > defaults) -> :class:`Recipe`.

Every validation error in a file is reported at once, each with the file and the dotted field path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fbnprune.errors import UserError
from fbnprune.recipe.schema import Recipe


class RecipeError(UserError):
    """A recipe that cannot be used; ``errors`` lists every problem found."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: {len(errors)} error(s)\n" + "\n".join(f"  - {e}" for e in errors))


def bundled_dir() -> Path:
    return Path(str(resources.files("fbnprune") / "recipes"))


def bundled_recipes() -> dict[str, Path]:
    """Bundled recipe name (file name without ``.yaml``) -> file: the recipes a user picks from.

    Only the top level of the recipes folder counts. The leaderboard's generated per-method, per-sparsity grid
    lives in ``benchmarks/leaderboard/grid/`` and runs from there as files; a subfolder left in the package (an
    older install) would only bury quickstart and analyze under a hundred near-identical names.
    """
    return {p.stem: p for p in sorted(bundled_dir().glob("*.yaml"))}


def find_recipe(name: str) -> Path:
    rec = bundled_recipes()
    key = name[:-5] if name.endswith(".yaml") else name
    if key in rec:
        return rec[key]
    import difflib

    close = difflib.get_close_matches(key, list(rec), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserError(f"no bundled recipe {name!r} (see `python -m fbnprune recipes`).{hint}")


def resolve_recipe_path(spec: str) -> Path:
    """A path to a recipe file, or the name of a bundled recipe."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    if p.suffix in (".yaml", ".yml") and ("/" in spec or p.exists()):
        # recipes/<name>.yaml in a checkout mirrors the bundled copy
        name = p.stem if p.parent.name == "recipes" else None
        if name and name in bundled_recipes():
            return bundled_recipes()[name]
        raise UserError(f"recipe file not found: {spec}")
    return find_recipe(spec)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise UserError(f"override {text!r}: value is not valid YAML") from e
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise UserError(f"override {text!r}: {part!r} is not a section")
            node = node[part]
        node[path[-1]] = value
    return data


def _format_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field missing"
        msg = msg.removeprefix("Value error, ")
        out.append(f"{loc}: {msg}")
    return out


def load_recipe(spec: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe file (or bundled name) with ``overrides`` applied."""
    path = resolve_recipe_path(str(spec))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(str(path), [f"not valid YAML: {e}"]) from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(str(path), ["root must be a mapping"])
    data = apply_overrides(data, list(overrides or []))
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(str(path), _format_errors(e)) from None
    except UserError as e:  # e.g. unknown scorer, raised inside a validator
        raise RecipeError(str(path), [str(e)]) from None


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (saved next to every output)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
