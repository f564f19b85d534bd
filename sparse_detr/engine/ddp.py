"""DistributedDataParallel wrapping that also works for CPU models (gloo)."""

from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["create_ddp_model"]


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """:func:`detectron2.engine.create_ddp_model` without ``device_ids`` for a model on the CPU.

    detectron2 always passes ``device_ids=[local_rank]``, which ``DistributedDataParallel`` rejects for a CPU
    module; on the CPU it must be left out. Returns ``model`` itself in a single process.
    """
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs and next(model.parameters()).device.type == "cuda":
        kwargs["device_ids"] = [comm.get_local_rank()]
    return DistributedDataParallel(model, **kwargs)
