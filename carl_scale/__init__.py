"""carl_scale: CARL frame-wise action representation learning from long videos, at scale.

The library never reads ``sys.argv``; entry points live in ``launch/``, ``shards/`` and
``tuning/`` and call into it.
"""

__version__ = "0.1.0"
