"""Replacing a submodule of a GraphModule by its dotted path (shared by the passes that rebuild layers)."""

from __future__ import annotations

from torch import fx, nn


def set_submodule(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``target`` inside ``gm``."""
    parent_name, _, attr = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, attr, module)
