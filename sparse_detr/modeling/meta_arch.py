"""`SparseDETR`: Deformable DETR, Efficient DETR and Sparse DETR as one detectron2 meta-architecture."""
import copy
import math
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.layers.wrappers import shapes_to_tensor
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn
from torchvision.ops import box_convert

from ..layers.box_ops import inverse_sigmoid
from ..layers.mlp import MLP
from ..layers.position_encoding import PositionEmbeddingSine
from .criterion import SetCriterion, build_weight_dict
from .matcher import HungarianMatcher
from .token_selection import keep_mask
from .transformer import DeformableTransformer

__all__ = ["SparseDETR"]


def _check_keep_ratios(rho: float, test_rho: float) -> None:
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"MODEL.SPARSE_DETR.RHO (rho) must be in [0, 1] (0 = dense encoder), got {rho}")
    if test_rho > 1.0:
        raise ValueError(f"MODEL.SPARSE_DETR.TEST_RHO (test_rho) must be <= 1 (<= 0 = use RHO), got {test_rho}")
    if test_rho > 0 and rho == 0:
        raise ValueError(
            f"MODEL.SPARSE_DETR.TEST_RHO (test_rho={test_rho}) needs a sparse model (MODEL.SPARSE_DETR.RHO > 0): "
            "a dense model has no scoring network"
        )


@META_ARCH_REGISTRY.register()
class SparseDETR(nn.Module):
    """Deformable DETR family on any detectron2 backbone.

    The backbone maps in `in_features` go through 1x1 conv + GroupNorm; further levels (up to the transformer's
    number of levels) come from stride-2 3x3 conv + GroupNorm, the first on the last backbone map itself, the next
    ones on the previous level. Variants are switched by the transformer (two-stage, Efficient DETR query
    init/class-specific head, scoring network) and by the arguments below.

    Training returns the weighted losses (detectron2 sums every value); class error, cardinality error and the
    DAM correlation go to the current EventStorage. Inference returns `[{"instances": Instances}]` with
    `pred_boxes`, `scores` and `pred_classes` in the original image size ("height"/"width" of the input).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: Sequence[str],
        transformer: DeformableTransformer,
        criterion: SetCriterion,
        num_classes: int,
        num_queries: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        aux_loss: bool = True,
        with_box_refine: bool = False,
        use_enc_aux_loss: bool = False,
        rho: float = 0.0,
        test_rho: float = -1.0,
        num_detections: int = 100,
    ):
        """
        Args:
            backbone: a detectron2 backbone producing `in_features`.
            in_features: backbone outputs fed to the transformer, finest first.
            transformer: see :class:`DeformableTransformer`; its num_feature_levels >= len(in_features).
            criterion: see :class:`SetCriterion`.
            num_classes: classes of the heads.
            num_queries: decoder queries (learned ones without two-stage).
            pixel_mean, pixel_std: input normalization, in the input format's channel order.
            aux_loss: losses on every decoder layer.
            with_box_refine: independent heads per decoder layer, each refining the previous layer's boxes.
            use_enc_aux_loss: detection heads and losses on the encoder queries of every layer but the last (the
                selected tokens; with a dense encoder, rho = 0, all tokens, as the reference allows); training only.
            rho: keeping ratio of encoder tokens in training (0 = dense); > 0 needs the transformer's scoring net.
            test_rho: keeping ratio at inference; <= 0 = rho.
            num_detections: detections kept per image (top-k over queries x classes).
        """
        super().__init__()
        _check_keep_ratios(rho, test_rho)
        if rho > 0 and not transformer.token_selection:
            raise ValueError("rho > 0 needs a transformer built with token_selection=True")
        if rho == 0 and transformer.token_selection:
            raise ValueError("a transformer with a scoring network (token_selection=True) needs rho > 0")
        output_shape: Dict[str, ShapeSpec] = backbone.output_shape()
        missing = [f for f in in_features if f not in output_shape]
        if not in_features or missing:
            raise ValueError(
                f"MODEL.SPARSE_DETR.IN_FEATURES {list(in_features)}: the backbone does not produce "
                f"{missing or 'an empty list'}; it produces {sorted(output_shape)}"
            )
        num_levels = transformer.num_feature_levels
        if num_levels < len(in_features):
            raise ValueError(
                f"MODEL.SPARSE_DETR.NUM_FEATURE_LEVELS ({num_levels}) must be >= the number of "
                f"MODEL.SPARSE_DETR.IN_FEATURES ({len(in_features)})"
            )
        hidden_dim = transformer.d_model
        if hidden_dim % 32 != 0:
            raise ValueError(
                f"MODEL.SPARSE_DETR.HIDDEN_DIM ({hidden_dim}) must be divisible by 32 (GroupNorm(32) in the input "
                "projections)"
            )

        self.backbone = backbone
        self.in_features = list(in_features)
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.use_enc_aux_loss = use_enc_aux_loss
        self.rho = rho
        self.test_rho = test_rho
        self.num_detections = num_detections
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

        in_channels = [output_shape[f].channels for f in self.in_features]
        projections = [
            nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)) for c in in_channels
        ]
        extra_in = in_channels[-1]
        for _ in range(num_levels - len(in_channels)):
            projections.append(
                nn.Sequential(
                    nn.Conv2d(extra_in, hidden_dim, kernel_size=3, stride=2, padding=1),
                    nn.GroupNorm(32, hidden_dim),
                )
            )
            extra_in = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.position_embedding = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        if not transformer.two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        self._build_heads(hidden_dim)

    def _build_heads(self, hidden_dim: int) -> None:
        """Heads in the transformer's order: decoder layers, two-stage proposals, encoder aux layers."""
        class_head = nn.Linear(hidden_dim, self.num_classes)
        bbox_head = MLP(hidden_dim, hidden_dim, 4, 3)
        prior_prob = 0.01
        nn.init.constant_(class_head.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(bbox_head.layers[-1].weight)
        nn.init.zeros_(bbox_head.layers[-1].bias)

        num_dec = self.transformer.decoder.num_layers
        num_heads = num_dec + int(self.transformer.two_stage)
        if self.use_enc_aux_loss:
            num_heads += self.transformer.encoder.num_layers - 1
        if self.with_box_refine or self.use_enc_aux_loss:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(num_heads))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_head) for _ in range(num_heads))
        else:
            # one head shared by all layers (and by the two-stage proposals)
            self.class_embed = nn.ModuleList([class_head] * num_heads)
            self.bbox_embed = nn.ModuleList([bbox_head] * num_heads)
        # the first decoder layer starts from small boxes (sigmoid(-2) ~ 0.12 of the image) around its reference
        # points; two-stage references are already boxes, so there every head starts at zero
        if not self.transformer.two_stage:
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        S = cfg.MODEL.SPARSE_DETR
        _check_keep_ratios(S.RHO, S.TEST_RHO)
        backbone = build_backbone(cfg)
        transformer = DeformableTransformer(
            d_model=S.HIDDEN_DIM,
            nhead=S.NHEADS,
            num_encoder_layers=S.ENC_LAYERS,
            num_decoder_layers=S.DEC_LAYERS,
            dim_feedforward=S.DIM_FEEDFORWARD,
            dropout=S.DROPOUT,
            num_feature_levels=S.NUM_FEATURE_LEVELS,
            enc_n_points=S.ENC_N_POINTS,
            dec_n_points=S.DEC_N_POINTS,
            two_stage=S.TWO_STAGE,
            num_queries=S.NUM_QUERIES,
            eff_query_init=S.EFF_QUERY_INIT,
            eff_specific_head=S.EFF_SPECIFIC_HEAD,
            token_selection=S.RHO > 0,
        )
        matcher = HungarianMatcher(cost_class=S.SET_COST_CLASS, cost_bbox=S.SET_COST_BBOX, cost_giou=S.SET_COST_GIOU)
        weight_dict = build_weight_dict(
            cls_loss_coef=S.CLS_LOSS_COEF,
            bbox_loss_coef=S.BBOX_LOSS_COEF,
            giou_loss_coef=S.GIOU_LOSS_COEF,
            mask_prediction_coef=S.MASK_PREDICTION_COEF,
            num_decoder_layers=S.DEC_LAYERS,
            aux_loss=S.AUX_LOSS,
            two_stage=S.TWO_STAGE,
            num_encoder_aux_layers=S.ENC_LAYERS - 1 if S.USE_ENC_AUX_LOSS else 0,
            token_selection=S.RHO > 0,
        )
        criterion = SetCriterion(
            S.NUM_CLASSES,
            matcher,
            weight_dict,
            focal_alpha=S.FOCAL_ALPHA,
            binary_enc_targets=not S.EFF_SPECIFIC_HEAD,
        )
        return {
            "backbone": backbone,
            "in_features": S.IN_FEATURES,
            "transformer": transformer,
            "criterion": criterion,
            "num_classes": S.NUM_CLASSES,
            "num_queries": S.NUM_QUERIES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "aux_loss": S.AUX_LOSS,
            "with_box_refine": S.WITH_BOX_REFINE,
            "use_enc_aux_loss": S.USE_ENC_AUX_LOSS,
            "rho": S.RHO,
            "test_rho": S.TEST_RHO,
            "num_detections": S.NUM_DETECTIONS,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def inference_rho(self) -> float:
        return self.test_rho if self.test_rho > 0 else self.rho

    @property
    def refine_boxes(self) -> bool:
        # kakaobrain/sparse-detr hands its decoder the heads only in two-stage mode: there it refines (with the
        # shared head unless cloned), and WITH_BOX_REFINE alone does not refine. We also refine for WITH_BOX_REFINE
        # alone, as Deformable DETR does; the paper's rows set both or neither, where the two agree.
        return self.with_box_refine or self.transformer.two_stage

    # ------------------------------------------------------------------------------------------------ inputs
    def preprocess_image(self, batched_inputs: List[Dict[str, Any]]) -> ImageList:
        """Normalize and pad the images to one batch (bottom/right padding)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        return ImageList.from_tensors(
            images, self.backbone.size_divisibility, padding_constraints=self.backbone.padding_constraints
        )

    @staticmethod
    def padding_mask(images: ImageList) -> Tensor:
        """[N, H, W] bool, True on the pixels that padding added."""
        H, W = images.tensor.shape[-2:]
        device = images.tensor.device
        # under jit tracing (fvcore, export) ImageList already holds the sizes as tensors
        sizes = [s if isinstance(s, Tensor) else shapes_to_tensor(s, device) for s in images.image_sizes]
        sizes = torch.stack(sizes).to(device)
        rows = torch.arange(H, device=device)[None, :, None] >= sizes[:, 0, None, None]
        cols = torch.arange(W, device=device)[None, None, :] >= sizes[:, 1, None, None]
        return rows | cols

    def prepare_targets(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Tensor]]:
        """Per image {"labels": [T], "boxes": [T, 4] cxcywh normalized by the image size before padding}."""
        targets = []
        for x in batched_inputs:
            if "instances" not in x:
                raise ValueError("SparseDETR training needs 'instances' (gt_boxes, gt_classes) in every input")
            instances = x["instances"].to(self.device)
            h, w = instances.image_size
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_convert(instances.gt_boxes.tensor, "xyxy", "cxcywh") / scale
            targets.append({"labels": instances.gt_classes, "boxes": boxes})
        return targets

    # ------------------------------------------------------------------------------------------------ model
    def _multi_level_inputs(self, images: ImageList) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Projected maps, padding masks and position embeddings of every transformer level."""
        features = self.backbone(images.tensor)
        mask = self.padding_mask(images)
        maps = [features[f] for f in self.in_features]
        srcs = [proj(x) for proj, x in zip(self.input_proj, maps)]
        sizes = [x.shape[-2:] for x in maps]
        last = maps[-1]
        for proj in self.input_proj[len(maps):]:
            last = proj(last)
            srcs.append(last)
            sizes.append(last.shape[-2:])
        masks = [F.interpolate(mask[None].float(), size=s).to(torch.bool)[0] for s in sizes]
        pos = [self.position_embedding(m).to(src.dtype) for src, m in zip(srcs, masks)]
        return srcs, masks, pos

    def _run_transformer(self, images: ImageList, rho: float, enc_aux: bool) -> Dict[str, Any]:
        srcs, masks, pos = self._multi_level_inputs(images)
        query_embed = None if self.transformer.two_stage else self.query_embed.weight
        return self.transformer(
            srcs,
            masks,
            pos,
            query_embed,
            self.class_embed,
            self.bbox_embed,
            rho=rho,
            refine_boxes=self.refine_boxes,
            enc_aux=enc_aux,
        )

    def _predictions(self, out: Dict[str, Any], layers: Sequence[int]) -> List[Tuple[Tensor, Tensor]]:
        """(logits [N, Q, num_classes], boxes [N, Q, 4] cxcywh in [0, 1]) of the given decoder layers."""
        preds = []
        for lid in layers:
            h = out["hs"][lid]
            reference = inverse_sigmoid(out["references"][lid])
            delta = self.bbox_embed[lid](h)
            if reference.shape[-1] == 4:
                boxes = delta + reference
            else:
                boxes = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            preds.append((self.class_embed[lid](h), boxes.sigmoid()))
        return preds

    def forward(self, batched_inputs: List[Dict[str, Any]]):
        """
        Args:
            batched_inputs: detectron2 format, per image {"image": [C, H, W] in the input format, "instances"
                (training: gt_boxes XYXY in the image's pixels, gt_classes), optional "height", "width" (the
                output resolution at inference)}.
        Returns:
            training: {loss name: weighted loss}; inference: per image {"instances": Instances}.
        """
        if not self.training:
            return self._inference(batched_inputs)[0]
        images = self.preprocess_image(batched_inputs)
        targets = self.prepare_targets(batched_inputs)
        out = self._run_transformer(images, self.rho, enc_aux=self.use_enc_aux_loss)
        num_dec = self.transformer.decoder.num_layers
        preds = self._predictions(out, range(num_dec) if self.aux_loss else [num_dec - 1])
        outputs: Dict[str, Any] = {"pred_logits": preds[-1][0], "pred_boxes": preds[-1][1]}
        if self.aux_loss:
            outputs["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in preds[:-1]]
        if self.transformer.two_stage:
            outputs["enc_outputs"] = {
                "pred_logits": out["enc_outputs_class"],
                "pred_boxes": out["enc_outputs_coord_unact"].sigmoid(),
            }
        if "enc_aux_outputs" in out:
            outputs["enc_aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in out["enc_aux_outputs"]]
        if "token_scores" in out:
            for key in ("token_scores", "padding_mask", "topk_inds", "num_kept", "dec_sampling_locations",
                        "dec_attention_weights", "spatial_shapes", "level_start_index", "shapes"):
                outputs[key] = out[key]
        losses, metrics = self.criterion(outputs, targets)
        self._log_metrics(metrics)
        return {k: v * self.criterion.weight_dict[k] for k, v in losses.items()}

    @staticmethod
    def _log_metrics(metrics: Dict[str, Tensor]) -> None:
        try:
            storage = get_event_storage()
        except AssertionError:  # not inside a trainer
            return
        names = list(metrics)
        values = torch.stack([metrics[k].detach().float() for k in names]).tolist()  # one host sync
        storage.put_scalars(**dict(zip(names, values)))

    # ------------------------------------------------------------------------------------------------ inference
    def _inference(self, batched_inputs: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Instances]], Dict[str, Any]]:
        images = self.preprocess_image(batched_inputs)
        out = self._run_transformer(images, self.inference_rho, enc_aux=False)
        logits, boxes = self._predictions(out, [self.transformer.decoder.num_layers - 1])[0]
        results = self.inference(logits, boxes, images.image_sizes)
        processed = []
        for result, x, size in zip(results, batched_inputs, images.image_sizes):
            height = x.get("height", size[0])
            width = x.get("width", size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed, out

    def inference(self, logits: Tensor, boxes: Tensor, image_sizes: List[Tuple[int, int]]) -> List[Instances]:
        """Top `num_detections` (query, class) pairs per image by sigmoid score.

        Args:
            logits: [N, Q, num_classes]
            boxes: [N, Q, 4] cxcywh normalized by the image size before padding.
            image_sizes: (h, w) of every image before padding.
        Returns:
            per image Instances of size (h, w) with pred_boxes (XYXY pixels), scores, pred_classes.
        """
        N, Q, C = logits.shape
        scores, index = logits.sigmoid().view(N, -1).topk(min(self.num_detections, Q * C), dim=1)
        query = torch.div(index, C, rounding_mode="floor")
        labels = index % C
        boxes = box_convert(boxes, "cxcywh", "xyxy").gather(1, query[..., None].expand(-1, -1, 4))
        results = []
        for i, (h, w) in enumerate(image_sizes):
            result = Instances((h, w))
            result.pred_boxes = Boxes(boxes[i])
            result.pred_boxes.scale(scale_x=w, scale_y=h)
            result.scores = scores[i]
            result.pred_classes = labels[i]
            results.append(result)
        return results

    @torch.no_grad()
    def inference_with_saliency(
        self, batched_inputs: List[Dict[str, Any]]
    ) -> Tuple[List[Dict[str, Instances]], List[Dict[str, List[Tensor]]]]:
        """Detections plus, per image, what the scoring network saw (for visualization).

        Returns:
            results: as the inference forward.
            saliency: per image {"scores": per level [h_l, w_l] float scoring-network logits, "kept": per level
                [h_l, w_l] bool, the tokens the encoder updates at the inference keeping ratio}, cropped to the
                image (padding removed), on the CPU.
        """
        if not self.transformer.token_selection:
            raise ValueError(
                "inference_with_saliency needs a Sparse DETR model (MODEL.SPARSE_DETR.RHO > 0); this one has a "
                "dense encoder and no scoring network"
            )
        if self.training:
            raise RuntimeError("inference_with_saliency runs the inference path: call model.eval() first")
        results, out = self._inference(batched_inputs)
        scores = out["token_scores"]
        kept = keep_mask(out["topk_inds"], out["num_kept"], scores.shape[1])
        sizes = [h * w for h, w in out["shapes"]]
        saliency = [{"scores": [], "kept": []} for _ in batched_inputs]
        for (h, w), s, k, m in zip(
            out["shapes"],
            scores.split(sizes, 1),
            kept.split(sizes, 1),
            out["padding_mask"].split(sizes, 1),
        ):
            m = m.view(-1, h, w)
            valid_h = (~m[:, :, 0]).sum(1).tolist()
            valid_w = (~m[:, 0, :]).sum(1).tolist()
            s = s.view(-1, h, w).float().cpu()
            k = k.view(-1, h, w).cpu()
            for i, (vh, vw) in enumerate(zip(valid_h, valid_w)):
                saliency[i]["scores"].append(s[i, :vh, :vw])
                saliency[i]["kept"].append(k[i, :vh, :vw])
        return results, saliency
