"""A student's projection head as a sentence-transformers `Dense` module: a linear layer after the pooling
(before `Normalize`), read and written in the folder layout sentence-transformers itself uses
(`<k>_Dense/config.json` + `model.safetensors` holding `linear.weight` and `linear.bias`; older folders'
`pytorch_model.bin` is read too).

A student saved with its stage-1 head (`distill.py --keep-head`) returns vectors in the teacher's space:
`SentenceTransformer(folder)` and `Encoder.from_pretrained(folder)` compute the same embeddings.
"""

import json
from pathlib import Path

from torch import nn

from ..core.errors import UserError

IDENTITY = "torch.nn.modules.linear.Identity"


def read_dense(folder: Path) -> nn.Linear:
    """The linear layer saved in a sentence-transformers Dense folder; only an identity activation is computed
    here (a Dense with tanh or another activation is refused in one line rather than computed wrongly)."""
    from safetensors.torch import load_file

    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
        if (folder / "model.safetensors").is_file() or not (folder / "pytorch_model.bin").is_file():
            weights = load_file(folder / "model.safetensors")
        else:  # sentence-transformers before 3.0 saved a Dense's weights as a torch pickle
            import torch

            weights = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{folder}: not a readable Dense module ({err}); save the model again") from None
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")  # sentence-transformers' default
    if activation != IDENTITY or config.get("use_residual"):
        raise UserError(
            f"{config_path}: a Dense module with activation {activation}"
            f"{' and a residual' if config.get('use_residual') else ''}; disco-dist computes linear heads only"
        )
    layer = nn.Linear(int(config["in_features"]), int(config["out_features"]), bias=bool(config.get("bias", True)))
    layer.load_state_dict({name.removeprefix("linear."): tensor for name, tensor in weights.items()})
    return layer


def write_dense(layer: nn.Linear, folder: Path) -> None:
    """Write `layer` as a sentence-transformers Dense module folder (identity activation)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": layer.bias is not None,
        "activation_function": IDENTITY,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {f"linear.{name}": t.detach().float().cpu().contiguous() for name, t in layer.state_dict().items()}
    save_file(tensors, folder / "model.safetensors")
