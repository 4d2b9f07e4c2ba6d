"""Recipes: images built from a YAML file of steps (``shoal build -f``), and ``shoal update``
(docs/spec/lineage.md §7)."""

from shoal.recipe.builder import ImageOutcome, RecipeOptions, build_recipe, recipe_of, store_input
from shoal.recipe.spec import CopySpec, ImageSpec, Recipe, load, parse

__all__ = ["CopySpec", "ImageSpec", "Recipe", "load", "parse", "ImageOutcome", "RecipeOptions", "build_recipe",
           "recipe_of", "store_input"]
