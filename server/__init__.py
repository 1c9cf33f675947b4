"""chatledger's aiohttp application: HTTP API, SSE, generation tasks, providers, CLI."""

from importlib import metadata

try:
    __version__ = metadata.version("chatledger")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
