"""carl_scale: CARL frame-wise action representation learning from long videos, at scale.

The library never reads ``sys.argv``; entry points live in ``launch/``, ``shards/`` and
``tuning/`` and call into it.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``carl_scale.load_model`` without importing torch when the package is imported."""
    if name == "load_model":
        from carl_scale.models.flavors import load_model

        return load_model
    raise AttributeError(f"module 'carl_scale' has no attribute {name!r}")
