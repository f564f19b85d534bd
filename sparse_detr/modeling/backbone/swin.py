"""Swin Transformer backbone built from timm, registered in detectron2's ``BACKBONE_REGISTRY``.

timm supplies the modules (and so the parameter names, which are those of its own and of the official Swin
checkpoints); the forward pass is written here because the paper's Swin code (the Swin-for-detection variant used by
kakaobrain/sparse-detr) differs from timm's block forward on inputs that are not a multiple of the window size: it
zero-pads each map to whole windows *before* the cyclic shift and builds the shift mask on the padded map, while timm
shifts first and pads afterwards. Following the detection variant keeps released Sparse DETR Swin-T checkpoints
numerically exact on every image size.
"""

import logging
from typing import Dict, List, Mapping, Optional, Tuple

import timm
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import nn

from ...weights_io import load_weights_file, state_dict_of

__all__ = ["TimmSwinBackbone", "build_swin_backbone", "load_swin_state_dict", "swin_state_dict_to_timm"]

logger = logging.getLogger(__name__)


class TimmSwinBackbone(Backbone):
    """Swin Transformer feature extractor with one LayerNorm per returned stage.

    Stage ``i`` (1-based, ``"stage{i}"``) has ``embed_dim * 2**(i-1)`` channels and stride ``4 * 2**(i-1)``; its
    output is normalized by ``norm{i-1}`` (the official detection layout's name). Any input size is accepted:
    the image is padded to the patch size, every attention map to whole windows, and odd maps before patch merging,
    so a ``H x W`` input gives ``ceil(H / 4)`` tokens per column at stage 1 and halves (rounding up) per stage.

    Parameter names are timm's: ``patch_embed.*``, ``layers.{i}.downsample.*`` (patch merging at the *start* of
    stage ``i >= 1``), ``layers.{i}.blocks.{j}.*``, plus ``norm{i}.*`` for the outputs.
    """

    @configurable
    def __init__(
        self,
        *,
        name: str = "swin_tiny_patch4_window7_224",
        in_chans: int = 3,
        out_features: List[str] = ("stage2", "stage3", "stage4"),
        frozen_stages: int = 2,
        drop_path_rate: float = 0.2,
        state_dict: Optional[Mapping[str, torch.Tensor]] = None,
        weights_source: str = "state_dict",
    ):
        """
        Args:
            name: a timm ``SwinTransformer`` model name; the model is always created with random weights.
            in_chans: channels of the input image.
            out_features: stages to return, a non-empty subset of ``"stage1"`` .. ``"stage4"``; stages after the
                last one requested are not built.
            frozen_stages: as the reference's ``frozen_stages``: -1 trains everything, 0 and 1 freeze the patch
                embedding, ``k >= 2`` also freezes the first ``k - 1`` stages *including* the patch merging that
                follows each of them (in timm that merging is the ``downsample`` opening the next stage). Frozen
                parameters get ``requires_grad=False``; modules keep following ``train()``/``eval()``, as in the
                reference, whose one-off ``eval()`` at construction is undone by the training loop's ``train()``.
            drop_path_rate: stochastic depth rate of the last block, rising linearly from 0 over all blocks.
            state_dict: timm-format or official-format Swin weights to initialize from (see
                :func:`load_swin_state_dict`); None = random init.
            weights_source: where ``state_dict`` came from, for the messages (from a config: the file of
                MODEL.SWIN.WEIGHTS).
        """
        super().__init__()
        if not isinstance(out_features, (list, tuple)) or not out_features:
            raise ValueError(f"out_features must be a non-empty list of stage names, got {out_features!r}")
        if name.split(".")[0] not in timm.list_models(module="swin_transformer"):
            raise ValueError(
                f"MODEL.SWIN.NAME must be a timm Swin Transformer, one of "
                f"{timm.list_models(module='swin_transformer')}; got {name!r}"
            )
        swin = timm.create_model(
            name,
            pretrained=False,  # weights only ever come from a local file (``weights``)
            num_classes=0,
            in_chans=in_chans,
            drop_path_rate=drop_path_rate,
            # Any input size: attention masks are built per forward, never for a fixed image size.
            strict_img_size=False,
            # Keep the configured window and shift even on maps smaller than a window (timm would otherwise
            # shrink the window of the last stage at 224 input and drop its shift), as the detection code does.
            always_partition=True,
        )

        num_stages = len(swin.layers)
        stage_names = [f"stage{i + 1}" for i in range(num_stages)]
        unknown = [f for f in out_features if f not in stage_names]
        if unknown:
            raise ValueError(f"out_features {unknown} are not stages of {name}; choose from {stage_names}")
        if not -1 <= frozen_stages <= num_stages:
            raise ValueError(f"frozen_stages must be in [-1, {num_stages}], got {frozen_stages}")

        self._out_features = [f for f in stage_names if f in out_features]
        last_stage = stage_names.index(self._out_features[-1])
        self.patch_size = swin.patch_embed.patch_size
        self.patch_embed = swin.patch_embed
        # timm's final `norm` and classifier head are for ImageNet and are dropped.
        self.layers = swin.layers[: last_stage + 1]

        self._out_feature_channels = {}
        self._out_feature_strides = {}
        for info, stage in zip(swin.feature_info, stage_names):
            if stage in self._out_features:
                self._out_feature_channels[stage] = info["num_chs"]
                self._out_feature_strides[stage] = info["reduction"]
                self.add_module(self._norm_name(stage), nn.LayerNorm(info["num_chs"]))

        if state_dict is not None:
            load_swin_state_dict(self, state_dict, source=weights_source)
        self._freeze(frozen_stages)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        weights = cfg.MODEL.SWIN.WEIGHTS
        return {
            "name": cfg.MODEL.SWIN.NAME,
            "in_chans": input_shape.channels,
            "out_features": cfg.MODEL.SWIN.OUT_FEATURES,
            "frozen_stages": cfg.MODEL.SWIN.FROZEN_STAGES,
            "drop_path_rate": cfg.MODEL.SWIN.DROP_PATH_RATE,
            "state_dict": state_dict_of(load_weights_file(weights, what="MODEL.SWIN.WEIGHTS")) if weights else None,
            "weights_source": weights or "state_dict",
        }

    @staticmethod
    def _norm_name(stage: str) -> str:
        return f"norm{int(stage[len('stage') :]) - 1}"

    def _freeze(self, frozen_stages: int) -> None:
        frozen: List[nn.Module] = []
        if frozen_stages >= 0:
            frozen.append(self.patch_embed)
        for i in range(min(frozen_stages - 1, len(self.layers))):
            frozen.append(self.layers[i].blocks)
            if i + 1 < len(self.layers):
                frozen.append(self.layers[i + 1].downsample)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)

    @property
    def size_divisibility(self) -> int:
        # No batch padding beyond the largest image, as the reference: the patch embedding and the windows pad
        # internally (unmasked, like the reference's Swin), so released Swin-T checkpoints reproduce exactly on
        # images of any size. Padding to 32 here would change what Swin sees at the border (it masks no padding),
        # and so the features.
        return 0

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: images ``[N, C, H, W]``, any ``H, W``.

        Returns:
            ``{"stage{i}": [N, C_i, ceil(H / s_i), ceil(W / s_i)]}`` for the requested stages, ``s_i`` their strides.
        """
        if x.dim() != 4:
            raise ValueError(f"TimmSwinBackbone takes [N, C, H, W] images, got shape {tuple(x.shape)}")
        ph, pw = self.patch_size
        x = F.pad(x, (0, -x.shape[-1] % pw, 0, -x.shape[-2] % ph))
        x = self.patch_embed(x)  # [N, H/4, W/4, C], channels-last as timm's stages expect
        outputs = {}
        for i, stage in enumerate(self.layers):
            x = stage.downsample(x)
            for block in stage.blocks:
                x = _block_forward(block, x)
            name = f"stage{i + 1}"
            if name in self._out_features:
                out = getattr(self, self._norm_name(name))(x)
                outputs[name] = out.permute(0, 3, 1, 2).contiguous()
        return outputs


def _block_forward(block: SwinTransformerBlock, x: torch.Tensor) -> torch.Tensor:
    """One Swin block as in the detection code: pad to whole windows, then shift, then masked window attention.

    Args:
        block: a timm block; its modules and window/shift sizes are used, not its forward.
        x: ``[N, H, W, C]``.

    Returns:
        ``[N, H, W, C]``.
    """
    _, H, W, C = x.shape
    wh, ww = block.window_size
    sh, sw = block.shift_size
    shortcut = x
    x = block.norm1(x)
    # The padded tokens are zeros after norm1 and, as in the reference, are not masked out as keys.
    x = F.pad(x, (0, 0, 0, -W % ww, 0, -H % wh))
    Hp, Wp = x.shape[1:3]
    shifted = sh > 0 or sw > 0
    if shifted:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
        # Built from the padded map, as the reference does, so the regions match the shifted padded layout.
        attn_mask = block.get_attn_mask(x)
    else:
        attn_mask = None
    windows = window_partition(x, (wh, ww)).view(-1, wh * ww, C)
    windows = block.attn(windows, mask=attn_mask)
    x = window_reverse(windows.view(-1, wh, ww, C), (wh, ww), Hp, Wp)
    if shifted:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
    x = x[:, :H, :W, :]
    x = shortcut + block.drop_path1(x)
    return x + block.drop_path2(block.mlp(block.norm2(x)))


# Keys of ImageNet checkpoints that a backbone has no use for: classifier, its final norm, non-persistent buffers.
_IGNORED_PREFIXES = ("head.", "norm.")
_IGNORED_SUFFIXES = ("relative_position_index", "attn_mask")


def swin_state_dict_to_timm(state_dict: Mapping[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], str]:
    """Swin weights in timm's or the official layout -> timm's names (this backbone's), without classifier or
    non-persistent buffers.

    The official layout (``layers.i.downsample`` closing stage ``i``; recognized by ``layers.0.downsample``) has
    its patch merging renamed to ``layers.{i+1}.downsample``, where timm opens the next stage with it.

    Returns:
        ``(renamed, layout)`` with ``layout`` "official" or "timm".
    """
    official = any(k.startswith("layers.0.downsample.") for k in state_dict)
    renamed: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(_IGNORED_PREFIXES) or key.endswith(_IGNORED_SUFFIXES):
            continue
        if official and key.startswith("layers.") and ".downsample." in key:
            stage, rest = key[len("layers.") :].split(".", 1)
            key = f"layers.{int(stage) + 1}.{rest}"
        renamed[key] = value
    return renamed, "official" if official else "timm"


def load_swin_state_dict(
    backbone: TimmSwinBackbone, state_dict: Mapping[str, torch.Tensor], source: str = "state_dict"
) -> None:
    """Load timm-format or official-format Swin weights into ``backbone``, checking every key.

    The output norms ``norm{i}`` may be absent (ImageNet checkpoints have none; they keep their fresh init, as the
    reference); weights of stages the backbone does not build are skipped. Any other missing, unexpected or
    mis-shaped key is an error.
    """
    renamed, layout = swin_state_dict_to_timm(state_dict)
    own = backbone.state_dict()
    num_built = len(backbone.layers)
    renamed = {k: v for k, v in renamed.items() if not (k.startswith("layers.") and int(k.split(".")[1]) >= num_built)}
    unexpected = [k for k in renamed if k not in own]
    optional = {k for k in own if k.split(".")[0] in {backbone._norm_name(f) for f in backbone._out_features}}
    missing = sorted(set(own) - set(renamed) - optional)
    mis_shaped = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in renamed.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mis_shaped:
        raise ValueError(
            f"Swin weights from {source} do not fit the backbone ({layout} layout): "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''} ({len(unexpected)}), "
            f"shape mismatches {mis_shaped[:10]}"
        )
    backbone.load_state_dict(renamed, strict=False)
    logger.info(
        f"Loaded {len(renamed)} Swin tensors from {source} ({layout} layout); fresh: {sorted(optional - set(renamed))}"
    )


@BACKBONE_REGISTRY.register()
def build_swin_backbone(cfg, input_shape: ShapeSpec) -> TimmSwinBackbone:
    """``MODEL.BACKBONE.NAME: "build_swin_backbone"``: a timm Swin configured by ``MODEL.SWIN``."""
    return TimmSwinBackbone(cfg, input_shape)
