"""The HTTP API server (FastAPI): ``create_app(llm, settings)``."""

from .app import create_app

__all__ = ["create_app"]
