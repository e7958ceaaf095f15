"""Recipes: strict pydantic schema, YAML loading with dotted overrides, bundled recipe lookup."""

from __future__ import annotations

from fbnprune.recipe.load import RecipeError, bundled_recipes, find_recipe, load_recipe, resolve_recipe_path
from fbnprune.recipe.schema import Recipe

__all__ = ["Recipe", "RecipeError", "bundled_recipes", "find_recipe", "load_recipe", "resolve_recipe_path"]
