"""LLM providers behind ``--llm``: one module each, one interface (:mod:`.base`)."""

from .base import Delta, Provider, ProviderError

__all__ = ["Delta", "Provider", "ProviderError"]
