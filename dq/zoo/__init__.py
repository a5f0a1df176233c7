"""The model zoo: dq's embedded digits DDPM (trained by dq/zoo/recipe_digits.py) and the loader for it and
for any diffusers model folder."""

from dq.zoo.loading import EMBEDDED_MODEL_DIR, LoadedModel, load_model, load_model_folder, model_folder

__all__ = ["EMBEDDED_MODEL_DIR", "LoadedModel", "load_model", "load_model_folder", "model_folder"]
