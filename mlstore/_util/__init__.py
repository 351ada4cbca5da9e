"""Leaf helpers shared by every layer: secret rules (:mod:`.redact`), the one fork rule
(:mod:`.process`) and the read/write file objects (:mod:`.files`).

Nothing here imports any other part of mlstore except :mod:`mlstore.errors`, so every
layer may use it.
"""
