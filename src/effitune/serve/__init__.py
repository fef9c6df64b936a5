"""HTTP serving of a model bundle: `create_app(bundle)` (needs the `serve` extra)."""
from .app import create_app

__all__ = ["create_app"]
