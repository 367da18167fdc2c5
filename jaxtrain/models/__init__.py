"""Models shipped with jaxtrain."""

from jaxtrain.models.gpt import GPT, GPTConfig
from jaxtrain.models.interop import from_torch_state_dict, to_torch_state_dict

__all__ = ["GPT", "GPTConfig", "from_torch_state_dict", "to_torch_state_dict"]
