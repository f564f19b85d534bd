"""The model as inference runs it fastest: :func:`prepare_for_inference`, an explicit step that returns a model
computing the same outputs (to float rounding) with less work.

The backbone runs as :class:`InferenceBackbone`: batch norms folded into their convolutions, channels_last. Both
change only the rounding of the results, never the model:

- At inference a batch norm after a convolution (detectron2's `FrozenBatchNorm2d`, or a `BatchNorm2d` in eval
  mode) is the affine map y = x * s + t per channel (s = gamma / sqrt(var + eps), t = beta - mean * s), so
  conv(x, w, b) * s + t = conv(x, w * s, b * s + t): one pass over the activations fewer per convolution.
- oneDNN runs convolutions on NHWC data; with NCHW tensors every convolution reorders its input and output. In
  channels_last the whole backbone stays NHWC (a ResNet-50 at 850x1040 on 2 CPU cores: 0.97 s -> 0.59 s), and so
  do its outputs, which the transformer flattens to [N, H*W, C] without a copy.

The transformer runs its fast path: the decoder samples the memory before projecting it, and two-stage proposal
boxes are computed only for the tokens that become queries (see `DeformableTransformer.forward`).

The prepared model is for inference only. It is a separate step, not a copy the model keeps and refreshes, so that
nothing in training, `load_state_dict` or `state_dict` has to know about it: prepare again after the weights change.
"""

import copy
from typing import Dict

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import Backbone
from torch import Tensor, nn

__all__ = ["InferenceBackbone", "fold_batch_norms", "prepare_for_inference"]


def _foldable(norm: nn.Module) -> bool:
    """A batch norm that is an affine map at inference: frozen, or with running statistics."""
    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return isinstance(norm, nn.BatchNorm2d) and norm.running_mean is not None and norm.running_var is not None


@torch.no_grad()
def fold_batch_norms(module: nn.Module) -> int:
    """In place: every detectron2 `Conv2d` whose `norm` is a `FrozenBatchNorm2d`, or a `BatchNorm2d` with running
    statistics (as it computes in eval mode), gets the norm folded into its weight and bias, and loses the norm.
    Returns how many were folded."""
    folded = 0
    for conv in module.modules():
        if not (isinstance(conv, Conv2d) and _foldable(conv.norm)):
            continue
        norm = conv.norm
        gamma = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
        beta = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
        scale = gamma * (norm.running_var + norm.eps).rsqrt()
        shift = beta - norm.running_mean * scale
        bias = shift if conv.bias is None else conv.bias * scale + shift
        conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
        conv.norm = None
        folded += 1
    return folded


class InferenceBackbone(Backbone):
    """A copy of a backbone with its batch norms folded (:func:`fold_batch_norms`), run in channels_last; the
    same outputs as the original in eval mode to float rounding, for inference only (no gradients).

    Args:
        backbone: a detectron2 backbone; it is copied, not changed.
    """

    def __init__(self, backbone: Backbone):
        super().__init__()
        # inference_mode(False): built from inside an inference_mode forward, the copy would hold inference
        # tensors, which a later forward with autograd on could not use
        with torch.inference_mode(False), torch.no_grad():
            body = copy.deepcopy(backbone).requires_grad_(False)
            self.num_folded = fold_batch_norms(body)
            self.body = body.to(memory_format=torch.channels_last)
        self.train(False)  # e.g. Swin's stochastic depth must stay off

    def train(self, mode: bool = True) -> "InferenceBackbone":
        if mode:
            raise RuntimeError(
                "this backbone has its batch norms folded for inference and cannot train: train the model that "
                "prepare_for_inference was given, and prepare it again"
            )
        return super().train(False)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """x: [N, C, H, W] -> the backbone's feature maps (channels_last strides)."""
        return self.body(x.contiguous(memory_format=torch.channels_last))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return self.body.output_shape()

    @property
    def size_divisibility(self) -> int:
        return self.body.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return self.body.padding_constraints


def prepare_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A `SparseDETR` for inference that computes what `model` computes in eval mode, faster: its backbone as an
    :class:`InferenceBackbone` and the transformer's fast path. In eval mode, without gradients.

    Args:
        model: a `SparseDETR`.
        inplace: change `model` itself (its backbone is replaced: the model can no longer train, and its state dict
            holds the folded backbone); by default a deep copy is prepared and `model` is left as it is.
    Returns:
        the prepared model. `train()` on it raises; its weights are a snapshot of `model`'s.
    """
    if isinstance(model.backbone, InferenceBackbone):
        return model
    if not inplace:
        model = copy.deepcopy(model)
    model.backbone = InferenceBackbone(model.backbone)
    model.fast_inference = True
    return model.eval().requires_grad_(False)
