"""Models shipped with jaxtrain."""

from jaxtrain.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
