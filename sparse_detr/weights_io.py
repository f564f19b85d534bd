"""Reading local weight files (checkpoints, backbone weights): one reader with errors that name the file and the
setting it came from."""

import logging
import os
from typing import Any, Mapping

import torch

__all__ = ["load_weights_file", "state_dict_of"]

logger = logging.getLogger(__name__)


def load_weights_file(path: str, what: str = "weights file") -> Mapping[str, Any]:
    """Load a local torch checkpoint (a mapping) on the CPU; ``what`` names it in errors (e.g. the config key).

    Plain tensor files load in ``weights_only`` mode; files that also pickle other objects (the official Swin
    releases keep their training config) fall back to a full unpickling, with a warning: only load files you trust.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        logger.warning(f"{path} holds more than tensors ({e.__class__.__name__}); loading it in full pickle mode")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{what} {path!r} does not hold a state dict (got {type(checkpoint).__name__})")
    return checkpoint


def state_dict_of(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict of a training checkpoint: its ``"model"`` entry, else its ``"state_dict"`` entry, else the
    checkpoint itself (a bare state dict)."""
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint
