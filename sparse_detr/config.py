"""Config keys of this project, added to a detectron2 `CfgNode` by :func:`add_sparse_detr_config`, and
:func:`setup_cfg`, which every tool builds its config with.

Every key has the reference implementation's default (kakaobrain/sparse-detr, `main.py`), so the base config is
plain Deformable DETR and each paper row switches on what it needs. YACS rejects keys that are not defined here;
that check is kept on so a typo in a config file is an error, not a silently ignored option.
"""

import logging
from typing import Sequence, Set

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .data.datasets import register_coco_instances_from_config

__all__ = ["add_sparse_detr_config", "merge_opts", "resolve_device", "setup_cfg"]

logger = logging.getLogger(__name__)

# Requested devices already warned about: a tool that loads several configs (the benchmark) says it once.
_warned_devices: Set[str] = set()


def setup_cfg(config_file: str, opts: Sequence[str] = (), *, freeze: bool = True) -> CN:
    """The config of a tool: detectron2's defaults, this project's keys, ``config_file``, then the command line's
    ``KEY VALUE`` overrides ``opts``, with :func:`resolve_device` applied. The COCO-format datasets of
    ``DATASETS.REGISTER_COCO_INSTANCES`` are registered here, so every tool can use them by name.

    Raises:
        KeyError: naming a key of ``config_file`` or ``opts`` that no config defines.
        ValueError: for an odd number of ``opts``, or a bad ``DATASETS.REGISTER_COCO_INSTANCES`` entry.
    """
    cfg = get_cfg()
    add_sparse_detr_config(cfg)
    cfg.merge_from_file(config_file)  # unknown keys raise here, before anything runs
    merge_opts(cfg, opts)
    register_coco_instances_from_config(cfg)
    cfg = resolve_device(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def merge_opts(cfg: CN, opts: Sequence[str]) -> None:
    """``cfg.merge_from_list(opts)`` with a KeyError for an unknown key, as ``merge_from_file`` raises; yacs only
    asserts there, which ``python -O`` would skip."""
    if len(opts) % 2:
        raise ValueError(f"Command-line overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
    for key in opts[0::2]:
        if cfg.key_is_deprecated(key) or cfg.key_is_renamed(key):
            continue  # yacs handles these itself
        node = cfg
        for part in key.split("."):
            if not isinstance(node, CN) or part not in node:
                raise KeyError(f"Non-existent config key: {key}")
            node = node[part]
    cfg.merge_from_list(list(opts))


def resolve_device(cfg: CN) -> CN:
    """The device policy of every tool: ``MODEL.DEVICE`` asking for CUDA on a machine without a GPU runs on the CPU,
    with a warning naming the key (once per process and device).

    Returns:
        ``cfg`` itself when it can run as it is, else a copy (frozen if ``cfg`` was) with ``MODEL.DEVICE`` "cpu".
    """
    device = cfg.MODEL.DEVICE
    if not device.startswith("cuda") or torch.cuda.is_available():
        return cfg
    if device not in _warned_devices:
        _warned_devices.add(device)
        logger.warning(
            f"MODEL.DEVICE is {device!r} but no GPU is available: running on the CPU "
            "(set MODEL.DEVICE cpu to silence this)"
        )
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    if frozen:
        cfg.freeze()
    return cfg


def add_sparse_detr_config(cfg: CN) -> None:
    """Add the keys of the SparseDETR meta-architecture, the timm Swin backbone, the DETR solver and data pipeline."""
    _add_model_config(cfg)
    _add_swin_config(cfg)
    _add_solver_config(cfg)
    _add_data_config(cfg)
    _add_own_data_config(cfg)


def _add_model_config(cfg: CN) -> None:
    cfg.MODEL.SPARSE_DETR = CN()
    S = cfg.MODEL.SPARSE_DETR
    # 80 for detectron2's contiguous COCO ids; the reference checkpoints use 91 (see the converter).
    S.NUM_CLASSES = 80
    # Backbone features fed to the transformer (strides 8, 16, 32); extra levels come from stride-2 convs.
    S.IN_FEATURES = ["res3", "res4", "res5"]
    S.NUM_FEATURE_LEVELS = 4
    S.HIDDEN_DIM = 256
    S.NHEADS = 8
    S.ENC_LAYERS = 6
    S.DEC_LAYERS = 6
    S.DIM_FEEDFORWARD = 1024
    S.DROPOUT = 0.1
    S.NUM_QUERIES = 300
    S.ENC_N_POINTS = 4
    S.DEC_N_POINTS = 4
    # Paper variants: Deformable DETR (+ WITH_BOX_REFINE, + TWO_STAGE), Efficient DETR (+ EFF_QUERY_INIT,
    # EFF_SPECIFIC_HEAD), Sparse DETR (+ RHO > 0, USE_ENC_AUX_LOSS).
    S.WITH_BOX_REFINE = False
    S.TWO_STAGE = False
    S.EFF_QUERY_INIT = False
    S.EFF_SPECIFIC_HEAD = False
    # Keeping ratio of encoder tokens; 0 = dense encoder (no scoring network).
    S.RHO = 0.0
    # Keeping ratio used at inference; a value <= 0 means "same as RHO". Lets a model trained at one ratio be
    # evaluated at another without retraining.
    S.TEST_RHO = -1.0
    S.USE_ENC_AUX_LOSS = False
    # Auxiliary decoding losses on every decoder layer.
    S.AUX_LOSS = True
    # Loss weights.
    S.CLS_LOSS_COEF = 2.0
    S.BBOX_LOSS_COEF = 5.0
    S.GIOU_LOSS_COEF = 2.0
    S.MASK_PREDICTION_COEF = 1.0
    # Hungarian matcher costs.
    S.SET_COST_CLASS = 2.0
    S.SET_COST_BBOX = 5.0
    S.SET_COST_GIOU = 2.0
    S.FOCAL_ALPHA = 0.25
    # Detections kept per image at inference (top-k over queries x classes).
    S.NUM_DETECTIONS = 100
    # Inference on a copy of the backbone with its frozen batch norms folded into the convolutions, in
    # channels_last (sparse_detr.modeling.fast_inference): the same outputs to float rounding, faster on CPUs.
    S.FAST_INFERENCE = True

    # Beyond the paper: what later work on Sparse DETR's sparse encoder (Focus-DETR, Salience-DETR) and DINO train
    # with, each a switch that is off by default (the paper's model; projects/SparseDETR/README.md, "Training
    # switches beyond the paper"; the convergence table in BENCHMARKS.md).
    # The target of the scoring network (RHO > 0), weighted by MASK_PREDICTION_COEF:
    #   "dam": the paper's: the top-rho tokens of the decoder's cross-attention map (multi-label soft-margin loss);
    #   "foreground": Focus-DETR's: 1 on a token whose centre lies inside a box whose size suits the token's level
    #     (SCORE_LEVEL_BOUNDS), else 0 (focal loss, alpha 0.25, gamma 2; Focus-DETR weighs it 1.5);
    #   "salience": Salience-DETR's: those tokens get 1 - (distance to the box centre in half-box units) / 2, a soft
    #     target the same for every box size (focal-weighted cross-entropy; Salience-DETR weighs it 2.0).
    # The last two read only the boxes: the decoder-attention map is not built (less work per training step).
    S.SCORE_TARGET = "dam"
    # ("foreground", "salience") A token of level l is assigned to a box containing its centre when its largest
    # distance to the box's edges, max(l, t, r, b) in input pixels, is in (bound[l-1], bound[l]] (level 0 from -1,
    # the last level to infinity): NUM_FEATURE_LEVELS - 1 increasing bounds. FCOS's and Focus-DETR's, for strides
    # 8..64 on images of about 800 pixels; scale them with the image size.
    S.SCORE_LEVEL_BOUNDS = [64.0, 128.0, 256.0]
    # (TWO_STAGE) DINO's mixed query selection: the decoder queries' position embedding from the top-k proposals'
    # boxes (as two-stage), their content learned (transformer.tgt_embed, NUM_QUERIES x HIDDEN_DIM, shared by the
    # images). Excludes EFF_QUERY_INIT (whose content is the proposals' encoder features).
    S.MIXED_QUERY_SELECTION = False
    # (WITH_BOX_REFINE or TWO_STAGE) DINO's look-forward-twice: a decoder layer's box loss also trains the previous
    # layer's box refinement (the refined box is detached only for the next layer's input). Same forward values.
    S.LOOK_FORWARD_TWICE = False
    # (TWO_STAGE) DINO's contrastive denoising in training: groups of noised ground-truth boxes and labels decoded
    # beside the matching queries, positives reconstructing their box and class, negatives (noised further) trained
    # as "no object"; losses loss_{ce,bbox,giou}_dn (and _dn_{i} per decoder layer with AUX_LOSS) with the weights of
    # the matching queries' losses. The matching queries never see them; nothing of it runs at inference. Adds
    # dn_label_embed (NUM_CLASSES x HIDDEN_DIM), re-initialized when fine-tuning to another NUM_CLASSES.
    S.DN = CN()
    S.DN.ENABLED = False
    # DINO's dn_number: positive queries per image at most (groups of every target: 100 // most targets of an image
    # in the batch, at least one group), and as many negatives.
    S.DN.NUMBER = 100
    # Share of the labels re-drawn from all classes is half of it, as DINO's dn_label_noise_ratio.
    S.DN.LABEL_NOISE_RATIO = 0.5
    # lambda: positives' corners move by less than lambda half-sizes of their box, negatives' by [lambda, 2 lambda).
    S.DN.BOX_NOISE_SCALE = 1.0


def _add_swin_config(cfg: CN) -> None:
    cfg.MODEL.SWIN = CN()
    W = cfg.MODEL.SWIN
    # Any timm Swin name (MODEL.BACKBONE.NAME "build_swin_backbone"); the weights come from WEIGHTS, never from a
    # hub download.
    W.NAME = "swin_tiny_patch4_window7_224"
    # Stages returned, "stage1".."stage4" (strides 4..32); each gets its own output LayerNorm, as the reference.
    W.OUT_FEATURES = ["stage2", "stage3", "stage4"]
    # The reference's frozen_stages: -1 none, 0/1 the patch embedding, k >= 2 also the first k-1 stages with the
    # patch merging after each. 2 (patch embedding and stage 1) is what the paper trains with.
    W.FROZEN_STAGES = 2
    # Stochastic depth of the last block, rising linearly from 0 (the reference's Swin-T yaml: 0.2).
    W.DROP_PATH_RATE = 0.2
    # Local path to an official ({"model": ...}) or timm-format Swin checkpoint; "" = random init.
    W.WEIGHTS = ""


def _add_solver_config(cfg: CN) -> None:
    # "ADAMW" (the reference's) or "SGD" (its --sgd, with SOLVER.MOMENTUM).
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    # Parameters whose name contains one of these (and none of LINEAR_PROJ_NAMES) get
    # BASE_LR * BACKBONE_MULTIPLIER (2e-5 in the paper); the reference's --lr_backbone_names.
    cfg.SOLVER.BACKBONE_NAMES = ["backbone."]
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    # Parameters whose name contains one of these get BASE_LR * LINEAR_PROJ_MULTIPLIER, backbone or not.
    cfg.SOLVER.LINEAR_PROJ_NAMES = ["reference_points", "sampling_offsets"]
    cfg.SOLVER.LINEAR_PROJ_MULTIPLIER = 0.1
    # The total batch size that MAX_ITER, STEPS, WARMUP_ITERS, CHECKPOINT_PERIOD and TEST.EVAL_PERIOD are written
    # for. With another IMS_PER_BATCH they are rescaled to keep the number of epochs; BASE_LR is kept, as the
    # reference does (sparse_detr.engine.scale_schedule_to_batch_size). 0 = use the counts as written.
    cfg.SOLVER.REFERENCE_BATCH_SIZE = 0


def _add_data_config(cfg: CN) -> None:
    # Keep the training images' file contents in memory (the reference's --cache_mode; see
    # sparse_detr.data.image_cache for why encoded bytes and not decoded pixels).
    cfg.DATALOADER.CACHE_IMAGES = False
    # Shorter-side sizes of the resize before the random crop (the reference's RandomResize([400, 500, 600])).
    cfg.INPUT.CROP.MIN_SIZE_BEFORE_CROP = (400, 500, 600)
    # How every resize computes the new size: "detectron2" (ResizeShortestEdge: both sides rounded) or "reference"
    # (the reference's arithmetic: the long side floored, e.g. 600x512 -> 937x800 instead of 938x800), which makes
    # converted released checkpoints see exactly the reference's pixels (projects/SparseDETR/CONVERTING.md).
    cfg.INPUT.RESIZE_ROUNDING = "detectron2"


def _add_own_data_config(cfg: CN) -> None:
    # COCO-format datasets of your own, registered by setup_cfg under their names (then usable in DATASETS.TRAIN
    # and DATASETS.TEST): a list of (name, json_file, image_root), as detectron2's register_coco_instances takes.
    # MODEL.SPARSE_DETR.NUM_CLASSES must equal the number of categories of every dataset trained or evaluated on.
    cfg.DATASETS.REGISTER_COCO_INSTANCES = []
    # Decode every image of DATASETS.TRAIN and DATASETS.TEST before training starts, and fail with the list of
    # those that cannot be decoded (otherwise a broken file stops the run when it is first drawn).
    cfg.DATALOADER.CHECK_IMAGES = False
