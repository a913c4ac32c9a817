"""Recipes: YAML files naming which quantizers get which format. Built-ins ship under `builtin/`."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import yaml

from dist_quant.recipe.schema import Algorithm, QuantCfgEntry, Recipe, RecipeError, parse_recipe

_BUILTIN = resources.files("dist_quant.recipe") / "builtin"


def builtin_recipe_names() -> list[str]:
    return sorted(entry.name[: -len(".yaml")] for entry in _BUILTIN.iterdir() if entry.name.endswith(".yaml"))


def _parse_text(text: str, name: str, source: str) -> Recipe:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise RecipeError(f"recipe {source}: invalid YAML{where}: {problem}") from None
    return parse_recipe(raw, name, source)


def load_recipe(recipe: str | os.PathLike | dict | Recipe) -> Recipe:
    """A Recipe from a built-in name, a YAML path, or already-parsed YAML data."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(recipe, "custom", "<dict>")
    path = Path(recipe)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise RecipeError(f"recipe {path}: not a text file (YAML expected)") from None
        return _parse_text(text, path.stem, str(path))
    builtin = _BUILTIN / f"{recipe}.yaml"
    if builtin.is_file():
        return _parse_text(builtin.read_text(), str(recipe), f"{recipe} (built-in)")
    raise RecipeError(
        f"recipe {str(recipe)!r}: no such file, and no built-in recipe of that name "
        f"(built-ins: {', '.join(builtin_recipe_names())})"
    )


__all__ = ["Algorithm", "QuantCfgEntry", "Recipe", "RecipeError", "builtin_recipe_names", "load_recipe"]
