"""Recipe blocks: the one validator that turns a recipe's YAML block (``model``, ``stage``, ``data``, ``lora``) into
its dataclass. torch-free, so the verb's parser stays light."""

from __future__ import annotations

import dataclasses


def recipe_block(cls, values: dict | None, block: str):
    """A recipe block (dict) → the dataclass ``cls``; unknown keys raise one ValueError naming them and the block."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Unknown {block} keys {unknown}; known: {sorted(known)}.")
    return cls(**values)
