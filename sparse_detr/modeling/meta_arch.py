"""`SparseDETR`: Deformable DETR, Efficient DETR and Sparse DETR as one detectron2 meta-architecture."""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone, detector_postprocess
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn
from torchvision.ops import box_convert

from .criterion import DenoisingPredictions, LossInputs, SetCriterion
from .deformable_decoder import DecoderOutput
from .denoising import (
    DenoisingInput,
    DenoisingQueries,
    DenoisingSettings,
    build_denoising_queries,
    denoising_match_indices,
)
from .heads import DetectionHeads, HeadLayout
from .levels import size_min, valid_sizes
from .neck import MultiLevelNeck, check_in_features
from .structures import Prediction, Target
from .transformer import DeformableTransformer, TransformerOutput

__all__ = ["SparseDETR"]


@META_ARCH_REGISTRY.register()
class SparseDETR(nn.Module):
    """Deformable DETR family on any detectron2 backbone.

    The backbone maps in `in_features` go through the neck (:class:`MultiLevelNeck`: projections to the
    transformer's levels, masks, position embeddings) into the transformer. The variant is the transformer's
    (two-stage, Efficient DETR query init, Sparse DETR's keeping ratio and scoring network), plus the heads' layout
    chosen here (box refinement, the encoder aux loss, Efficient DETR's class-specific proposal head). Beyond the
    paper, training may add DINO's contrastive denoising queries (`denoising`); the criterion's target of the
    scoring network and the transformer's query selection and decoder gradients are switches of their own.

    Training returns the weighted losses (detectron2 sums every value); class error, cardinality error and the
    DAM correlation go to the current EventStorage. Inference returns `[{"instances": Instances}]` with
    `pred_boxes`, `scores` and `pred_classes` in the original image size ("height"/"width" of the input).

    Inference runs the model as written; :func:`~sparse_detr.modeling.prepare_for_inference` makes the model that
    computes the same outputs (to float rounding) with less work.

    Errors name the argument and the config key it is read from.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: Sequence[str],
        neck: MultiLevelNeck,
        transformer: DeformableTransformer,
        criterion: SetCriterion,
        num_classes: int,
        num_queries: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        aux_loss: bool = True,
        with_box_refine: bool = False,
        use_enc_aux_loss: bool = False,
        eff_specific_head: bool = False,
        num_detections: int = 100,
        denoising: Optional[DenoisingSettings] = None,
    ):
        """
        Args:
            backbone: a detectron2 backbone producing `in_features`.
            in_features: backbone outputs fed to the neck, finest first.
            neck: maps them to the transformer's levels (as many, of its d_model channels).
            transformer: see :class:`DeformableTransformer`.
            criterion: see :class:`SetCriterion`, for `num_classes` classes.
            num_classes: classes of the heads.
            num_queries: decoder queries (learned ones without two-stage).
            pixel_mean, pixel_std: input normalization, in the input format's channel order.
            aux_loss: losses on every decoder layer.
            with_box_refine: independent heads per decoder layer, each refining the previous layer's boxes.
            use_enc_aux_loss: detection heads and losses on the encoder queries of every layer but the last (the
                selected tokens; with a dense encoder, rho = 0, all tokens, as the reference allows); training only.
            eff_specific_head: (two-stage) Efficient DETR's class-specific proposal head (see :class:`HeadLayout`).
            num_detections: detections kept per image (top-k over queries x classes).
            denoising: (two-stage) train with DINO's contrastive denoising queries, drawn as these settings say
                (adds `dn_label_embed`, one row per class); None: without. Inference never runs them.
        """
        super().__init__()
        check_in_features(in_features, backbone.output_shape())
        if (neck.num_inputs, neck.num_levels, neck.hidden_dim) != (
            len(in_features),
            transformer.num_feature_levels,
            transformer.d_model,
        ):
            raise ValueError(
                f"neck: it takes {neck.num_inputs} maps to {neck.num_levels} levels of {neck.hidden_dim} channels; "
                f"the model feeds it {len(in_features)} (MODEL.SPARSE_DETR.IN_FEATURES) and the transformer takes "
                f"{transformer.num_feature_levels} levels (NUM_FEATURE_LEVELS) of {transformer.d_model} (HIDDEN_DIM)"
            )
        if criterion.num_classes != num_classes:
            raise ValueError(
                f"num_classes ({num_classes}) and the criterion's num_classes ({criterion.num_classes}) differ "
                "(both are MODEL.SPARSE_DETR.NUM_CLASSES from a config)"
            )
        if denoising is not None and not transformer.two_stage:
            raise ValueError(
                "denoising (MODEL.SPARSE_DETR.DN.ENABLED) needs two_stage (MODEL.SPARSE_DETR.TWO_STAGE): the "
                "denoising queries' references are boxes, as the two-stage queries'"
            )
        if transformer.decoder.look_forward_twice and not (with_box_refine or transformer.two_stage):
            raise ValueError(
                "look-forward-twice (MODEL.SPARSE_DETR.LOOK_FORWARD_TWICE) needs box refinement "
                "(MODEL.SPARSE_DETR.WITH_BOX_REFINE or TWO_STAGE): it changes the gradients of refined boxes"
            )
        if criterion.score_target != "dam" and not transformer.has_scoring_network:
            raise ValueError(
                f"the scoring network's target (MODEL.SPARSE_DETR.SCORE_TARGET) {criterion.score_target!r} needs a "
                "scoring network (MODEL.SPARSE_DETR.RHO > 0)"
            )

        self.backbone = backbone
        self.in_features = list(in_features)
        self.transformer = transformer
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.num_detections = num_detections
        # set by prepare_for_inference: the transformer's fast path (the same outputs with less work)
        self.fast_inference = False
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        # registered under the reference's name, which checkpoints pin (see MultiLevelNeck)
        self.input_proj = neck
        if not transformer.two_stage:
            self.query_embed = nn.Embedding(num_queries, transformer.d_model * 2)

        self.head_layout = HeadLayout.of(
            transformer.decoder.num_layers,
            transformer.two_stage,
            transformer.encoder.num_layers,
            use_enc_aux_loss,
            with_box_refine,
            eff_specific_head,
        )
        heads = DetectionHeads.build(transformer.d_model, num_classes, self.head_layout)
        # registered under the reference's names, which checkpoints pin
        self.class_embed = heads.class_embed
        self.bbox_embed = heads.bbox_embed
        self.denoising = denoising
        if denoising is not None:
            # DINO's label_enc: the content of a denoising query is its (noised) label's embedding
            self.dn_label_embed = nn.Embedding(num_classes, transformer.d_model)

    @classmethod
    def from_config(cls, cfg) -> Dict[str, Any]:
        S = cfg.MODEL.SPARSE_DETR
        backbone = build_backbone(cfg)
        # built in the reference's order: the random initial weights draw in that order
        transformer = DeformableTransformer(cfg)
        criterion = SetCriterion(cfg)
        return {
            "backbone": backbone,
            "in_features": S.IN_FEATURES,
            "transformer": transformer,
            "criterion": criterion,
            "neck": MultiLevelNeck(cfg, backbone.output_shape()),
            "num_classes": S.NUM_CLASSES,
            "num_queries": S.NUM_QUERIES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "aux_loss": S.AUX_LOSS,
            "with_box_refine": S.WITH_BOX_REFINE,
            "use_enc_aux_loss": S.USE_ENC_AUX_LOSS,
            "eff_specific_head": S.EFF_SPECIFIC_HEAD,
            "num_detections": S.NUM_DETECTIONS,
            "denoising": (
                DenoisingSettings(S.DN.NUMBER, S.DN.LABEL_NOISE_RATIO, S.DN.BOX_NOISE_SCALE) if S.DN.ENABLED else None
            ),
        }

    @property
    def heads(self) -> DetectionHeads:
        """The detection heads by role: `.decoder`, `.proposal`, `.encoder_aux`."""
        return DetectionHeads(self.class_embed, self.bbox_embed, self.head_layout)

    def class_indexed_modules(self) -> List[str]:
        """Names of the modules whose parameters have one row per class: the class heads of every index, and the
        denoising label embedding. Fine-tuning to another number of classes starts them anew."""
        return self.heads.class_head_names() + (["dn_label_embed"] if self.denoising is not None else [])

    @property
    def rho(self) -> float:
        """Sparse DETR's keeping ratio in training (the transformer's); 0 = dense encoder."""
        return self.transformer.rho

    @property
    def inference_rho(self) -> float:
        return self.transformer.inference_rho

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def refine_boxes(self) -> bool:
        # kakaobrain/sparse-detr hands its decoder the heads only in two-stage mode: there it refines (with the
        # shared head unless cloned), and WITH_BOX_REFINE alone does not refine. We also refine for WITH_BOX_REFINE
        # alone, as Deformable DETR does; the paper's rows set both or neither, where the two agree.
        return self.with_box_refine or self.transformer.two_stage

    # ------------------------------------------------------------------------------------------------ inputs
    def normalize(self, image: Tensor) -> Tensor:
        """[C, H, W] pixels in the input format -> normalized, on the model's device."""
        return (image.to(self.device) - self.pixel_mean) / self.pixel_std

    def preprocess_image(self, batched_inputs: List[Dict[str, Any]]) -> ImageList:
        """Normalize and pad the images to one batch (bottom/right padding)."""
        images = [self.normalize(x["image"]) for x in batched_inputs]
        return ImageList.from_tensors(
            images, self.backbone.size_divisibility, padding_constraints=self.backbone.padding_constraints
        )

    @staticmethod
    def padding_mask(images: ImageList) -> Tensor:
        """[N, H, W] bool, True on the pixels that padding added."""
        H, W = images.tensor.shape[-2:]
        device = images.tensor.device
        # under jit tracing (fvcore) ImageList already holds the sizes as tensors; torch.tensor (unlike
        # torch.as_tensor) keeps torch.export's symbolic sizes symbolic
        sizes = [s if isinstance(s, Tensor) else torch.tensor(s, device=device) for s in images.image_sizes]
        sizes = torch.stack(sizes).to(device)
        rows = torch.arange(H, device=device)[None, :, None] >= sizes[:, 0, None, None]
        cols = torch.arange(W, device=device)[None, None, :] >= sizes[:, 1, None, None]
        return rows | cols

    def prepare_targets(self, batched_inputs: List[Dict[str, Any]]) -> List[Target]:
        """Per image its classes and its boxes as cxcywh normalized by the image size before padding.

        Raises:
            ValueError: an input without instances, or with a box that is not finite XYXY (x1 >= x0, y1 >= y0);
                the dataset mapper never makes one, boxes given from Python may.
        """
        targets = []
        for i, x in enumerate(batched_inputs):
            if "instances" not in x:
                raise ValueError("SparseDETR training needs 'instances' (gt_boxes, gt_classes) in every input")
            # checked where the loader put them (the CPU): no device sync
            given = x["instances"].gt_boxes.tensor
            bad = ~given.isfinite().all(1) | (given[:, 2] < given[:, 0]) | (given[:, 3] < given[:, 1])
            if bad.any():
                j = int(bad.nonzero()[0])
                raise ValueError(
                    f"batched_inputs[{i}]['instances'].gt_boxes[{j}] is {given[j].tolist()}: boxes must be finite "
                    "XYXY pixels with x1 >= x0 and y1 >= y0"
                )
            instances = x["instances"].to(self.device)
            h, w = instances.image_size
            scale = torch.as_tensor([w, h, w, h], dtype=torch.float32, device=self.device)
            boxes = box_convert(instances.gt_boxes.tensor, "xyxy", "cxcywh") / scale
            targets.append(Target(instances.gt_classes, boxes))
        return targets

    # ------------------------------------------------------------------------------------------------ model
    def _run_transformer(
        self, images: ImageList, features: Dict[str, Tensor], denoising: Optional[DenoisingInput] = None
    ) -> TransformerOutput:
        """features: the backbone's maps of `images.tensor`; denoising: queries decoded beside the others."""
        srcs, masks, pos = self.input_proj([features[f] for f in self.in_features], self.padding_mask(images))
        query_embed = None if self.transformer.two_stage else self.query_embed.weight
        return self.transformer(
            srcs,
            masks,
            pos,
            query_embed,
            self.heads,
            refine_boxes=self.refine_boxes,
            enc_aux=self.training and self.head_layout.num_encoder_aux > 0,
            fast=not self.training and self.fast_inference,
            denoising=denoising,
        )

    def _decoder_predictions(self, decoder: DecoderOutput, layers: Sequence[int]) -> List[Prediction]:
        """The predictions of the given decoder layers."""
        heads = self.heads.decoder
        return [heads[i].predict(decoder.hs[i], decoder.references[i]) for i in layers]

    def _denoising_queries(self, targets: List[Target]) -> DenoisingQueries:
        """DINO's denoising queries of a training batch. Their noise is drawn from a generator seeded from torch's
        global generator: the trainer seeds that at every step, so a resumed run draws the same noise."""
        seed = int(torch.randint(2**62, ()))
        settings = self.denoising
        return build_denoising_queries(
            targets,
            num_classes=self.num_classes,
            dn_number=settings.number,
            label_noise_ratio=settings.label_noise_ratio,
            box_noise_scale=settings.box_noise_scale,
            num_matching_queries=self.num_queries,
            generator=torch.Generator().manual_seed(seed),
        )

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
        dn_queries = dn_input = None
        if self.denoising is not None:
            dn_queries = self._denoising_queries(targets)
            if dn_queries.num_queries > 0:
                dn_input = dn_queries.decoder_input(self.dn_label_embed)
        out = self._run_transformer(images, self.backbone(images.tensor), dn_input)
        num_dec = self.head_layout.num_decoder_layers
        layers = range(num_dec) if self.aux_loss else [num_dec - 1]
        preds = self._decoder_predictions(out.decoder, layers)
        inputs = LossInputs(
            final=preds[-1],
            decoder_aux=preds[:-1],
            proposals=out.proposals,
            encoder_aux=out.encoder_aux,
            selection=out.selection,
            levels=out.levels,
            decoder=out.decoder,
            image_sizes=images.image_sizes,
        )
        if dn_queries is not None:
            if out.denoising is None:
                inputs.denoising = DenoisingPredictions(final=None)
            else:
                dn_preds = self._decoder_predictions(out.denoising, layers)
                inputs.denoising = DenoisingPredictions(
                    dn_preds[-1], dn_preds[:-1], denoising_match_indices(dn_queries), dn_queries.num_groups
                )
        losses, metrics = self.criterion(inputs, targets)
        if dn_queries is not None and out.denoising is None:
            # a batch without targets has no denoising query: the label embedding joins the graph at zero cost, so
            # that DDP (without find_unused_parameters) still finds its gradient, as DINO does
            losses["loss_ce_dn"] = losses["loss_ce_dn"] + 0.0 * self.dn_label_embed.weight.sum()
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
    def _inference(self, batched_inputs: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Instances]], TransformerOutput]:
        images = self.preprocess_image(batched_inputs)
        results, out = self.detect(images, self.backbone(images.tensor))
        processed = []
        for result, x, size in zip(results, batched_inputs, images.image_sizes):
            height = x.get("height", size[0])
            width = x.get("width", size[1])
            processed.append({"instances": detector_postprocess(result, height, width)})
        return processed, out

    def detect(self, images: ImageList, features: Dict[str, Tensor]) -> Tuple[List[Instances], TransformerOutput]:
        """Detections of a preprocessed batch, in the padded input's pixels (before `detector_postprocess`).

        Args:
            images: normalized, padded images.
            features: the backbone's maps of `images.tensor`.
        """
        out = self._run_transformer(images, features)
        logits, boxes = self._decoder_predictions(out.decoder, [self.head_layout.num_decoder_layers - 1])[0]
        return self.inference(logits, boxes, images.image_sizes), out

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
        scores, index = logits.sigmoid().view(N, -1).topk(size_min(self.num_detections, Q * C), dim=1)
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
        if not self.transformer.has_scoring_network:
            raise ValueError(
                "inference_with_saliency needs a Sparse DETR model (MODEL.SPARSE_DETR.RHO > 0); this one has a "
                "dense encoder and no scoring network"
            )
        if self.training:
            raise RuntimeError("inference_with_saliency runs the inference path: call model.eval() first")
        results, out = self._inference(batched_inputs)
        levels, selection = out.levels, out.selection
        saliency = [{"scores": [], "kept": []} for _ in batched_inputs]
        for (h, w), s, k, m in zip(
            levels.shapes,
            levels.split(selection.scores),
            levels.split(selection.keep_mask()),
            levels.level_masks(),
        ):
            s = s.view(-1, h, w).float().cpu()
            k = k.view(-1, h, w).cpu()
            for i, (vh, vw) in enumerate(valid_sizes(m).tolist()):
                saliency[i]["scores"].append(s[i, :vh, :vw])
                saliency[i]["kept"].append(k[i, :vh, :vw])
        return results, saliency
