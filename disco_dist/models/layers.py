"""A model's list of transformer layers: finding it in any architecture, and keeping a subset of it."""

from torch import nn

from ..core.errors import UserError


def transformer_layers(model: nn.Module) -> tuple:
    """(parent module, attribute name) of the model's list of transformer layers."""
    for parent_path, attr in (("encoder", "layer"), ("encoder", "layers"), ("", "layers"), ("transformer", "layer")):
        parent = getattr(model, parent_path, None) if parent_path else model
        if isinstance(getattr(parent, attr, None), nn.ModuleList):
            return parent, attr
    raise UserError(f"cannot find the transformer layers of {type(model).__name__} to keep a subset of them")


def keep_layers(model: nn.Module, layers: list) -> nn.Module:
    """Keep only the given transformer layers (0-based, in the given order), in place."""
    parent, attr = transformer_layers(model)
    existing = getattr(parent, attr)
    bad = [i for i in layers if not 0 <= i < len(existing)]
    if bad or not layers:
        raise UserError(f"--keep-layers {layers}: the model has layers 0..{len(existing) - 1}")
    setattr(parent, attr, nn.ModuleList([existing[i] for i in layers]))
    model.config.num_hidden_layers = len(layers)
    return model
