"""galerne: an open, portable, customizable engine for Mistral-family LLMs."""

from .errors import GalerneError
from .llm import LLM, CompletionOutput, RequestOutput
from .sampling.params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "GalerneError", "__version__"]
