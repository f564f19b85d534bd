"""The paper's model variants (and the switches beyond it) as MODEL.SPARSE_DETR switches, shared by the tests
(importable from every test folder: pytest puts tests/ on sys.path for the root conftest.py)."""

from typing import Any, Dict, List

from detectron2.config import CfgNode

BBR_TWO_STAGE: Dict[str, Any] = dict(WITH_BOX_REFINE=True, TWO_STAGE=True)
EFFICIENT_DETR: Dict[str, Any] = dict(BBR_TWO_STAGE, EFF_QUERY_INIT=True, EFF_SPECIFIC_HEAD=True)
SPARSE_DETR: Dict[str, Any] = dict(EFFICIENT_DETR, RHO=0.3, USE_ENC_AUX_LOSS=True)

# The four rows the paper compares.
PAPER_VARIANTS: Dict[str, Dict[str, Any]] = {
    "deformable_detr": {},
    "deformable_detr_bbr_two_stage": BBR_TWO_STAGE,
    "efficient_detr": EFFICIENT_DETR,
    "sparse_detr_enc_aux": SPARSE_DETR,
}

# Beyond the paper: Sparse DETR with the training switches of later work (projects/SparseDETR/README.md), and the
# recipe the README recommends for training from scratch (as configs/demo/sparse_detr_fg_dn_shapes.yaml). Nested
# dicts are sub-nodes (tiny_cfg and set_sparse_detr_keys in conftest.py set them).
FOREGROUND: Dict[str, Any] = dict(SPARSE_DETR, SCORE_TARGET="foreground")
SALIENCE: Dict[str, Any] = dict(SPARSE_DETR, SCORE_TARGET="salience")
DAM_DN: Dict[str, Any] = dict(SPARSE_DETR, DN=dict(ENABLED=True))
RECIPE: Dict[str, Any] = dict(
    FOREGROUND, EFF_QUERY_INIT=False, MIXED_QUERY_SELECTION=True, LOOK_FORWARD_TWICE=True, DN=dict(ENABLED=True)
)


def set_sparse_detr_keys(cfg: CfgNode, keys: Dict[str, Any]) -> None:
    """Set ``MODEL.SPARSE_DETR`` keys; a dict value sets keys of that sub-node (unknown keys are errors)."""
    S = cfg.MODEL.SPARSE_DETR
    for key, value in keys.items():
        if isinstance(value, dict):
            S[key].merge_from_other_cfg(CfgNode(value))
        else:
            setattr(S, key, value)


# Command-line overrides that make the Sparse DETR smoke config (configs/demo/sparse_detr_shapes_smoke.yaml) a
# dense Deformable DETR.
DENSE_OVERRIDES: List[str] = [
    *("MODEL.SPARSE_DETR.RHO", "0.0"),
    *("MODEL.SPARSE_DETR.USE_ENC_AUX_LOSS", "False"),
    *("MODEL.SPARSE_DETR.EFF_QUERY_INIT", "False"),
    *("MODEL.SPARSE_DETR.EFF_SPECIFIC_HEAD", "False"),
]
