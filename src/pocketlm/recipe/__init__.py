"""`pocketlm recipe`: the Phi-3 recipe end to end at small scale (data -> two pretraining phases -> SFT -> DPO ->
quantize -> eval -> report), resumable at every step. See `runner.py` for the step graph and `recipes.py` for the
named recipes (nano, micro, nano-smoke)."""

from pocketlm.recipe.recipes import RECIPES, Recipe, StageSpec, get_recipe
from pocketlm.recipe.runner import STEPS, Context, Paused, RecipeChanged, RecipeError, run_recipe

__all__ = ["RECIPES", "Recipe", "StageSpec", "get_recipe", "STEPS", "Context", "Paused", "RecipeChanged",
           "RecipeError", "run_recipe"]
