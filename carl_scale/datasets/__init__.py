"""Dataset -> shards: one converter per dataset (synthetic, a folder of videos, PennAction,
FineGym, Pouring) and the one shard writer they all go through (:mod:`carl_scale.datasets.writer`).

Nothing here runs during training: :mod:`carl_scale.data` reads what these write (the shard
format and ``shards.json``, :mod:`carl_scale.data.manifest`).
"""
