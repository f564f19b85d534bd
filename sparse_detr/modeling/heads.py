"""The detection heads, by role: every decoder layer, the two-stage proposals, the encoder aux layers.

The heads are stored as two lists, `class_embed` and `bbox_embed`, in the reference's order: decoder layers
0 .. n-1, then the two-stage proposal head, then encoder layers 0 .. m-2 (the encoder aux loss). That order is what
released and converted checkpoints pin (`class_embed.{i}.*`, `bbox_embed.{i}.*`); :class:`HeadLayout` is the one
place that knows it, and :class:`DetectionHeads` gives each role a name.
"""

import copy
import math
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

from torch import Tensor, nn

from ..layers.box_ops import apply_box_delta
from ..layers.mlp import MLP
from .structures import Prediction

__all__ = ["HeadLayout", "DetectionHead", "DetectionHeads"]

# the prior probability of an object that the class heads start at (focal loss initialization)
PRIOR_PROB = 0.01


@dataclass(frozen=True)
class HeadLayout:
    """Which index of `class_embed` / `bbox_embed` serves which role, and the rules that follow from the variant:
    whether one head serves every role, and how the two-stage proposals are scored.

    Attributes:
        num_decoder_layers: one head per decoder layer, first.
        two_stage: then one head scoring the encoder's proposals.
        num_encoder_aux: then one head per encoder layer but the last (Sparse DETR's encoder aux loss), or 0.
        shared: one head module for every index (no box refinement, no encoder aux loss: the reference clones its
            heads only for those).
        binary_proposals: (two-stage) the proposal head scores objectness: its class 0 ranks the proposals and every
            target trains as class 0 (Deformable DETR); False: Efficient DETR's class-specific proposal head,
            ranked by the best class and trained with the targets' classes.
    """

    num_decoder_layers: int
    two_stage: bool
    num_encoder_aux: int = 0
    shared: bool = True
    binary_proposals: bool = True

    @classmethod
    def of(
        cls,
        num_decoder_layers: int,
        two_stage: bool,
        num_encoder_layers: int,
        encoder_aux_loss: bool,
        box_refine: bool = False,
        class_specific_proposals: bool = False,
    ) -> "HeadLayout":
        """The layout of a model: the encoder aux loss puts heads on every encoder layer but the last; box
        refinement or the encoder aux loss give every index its own head."""
        if class_specific_proposals and not two_stage:
            raise ValueError(
                "class_specific_proposals (MODEL.SPARSE_DETR.EFF_SPECIFIC_HEAD) needs two_stage "
                "(MODEL.SPARSE_DETR.TWO_STAGE): it scores the encoder-output proposals"
            )
        return cls(
            num_decoder_layers,
            two_stage,
            num_encoder_layers - 1 if encoder_aux_loss else 0,
            shared=not (box_refine or encoder_aux_loss),
            binary_proposals=not class_specific_proposals,
        )

    @classmethod
    def from_config(cls, cfg) -> "HeadLayout":
        """The layout of the model MODEL.SPARSE_DETR describes."""
        S = cfg.MODEL.SPARSE_DETR
        return cls.of(
            S.DEC_LAYERS, S.TWO_STAGE, S.ENC_LAYERS, S.USE_ENC_AUX_LOSS, S.WITH_BOX_REFINE, S.EFF_SPECIFIC_HEAD
        )

    @property
    def decoder(self) -> range:
        return range(self.num_decoder_layers)

    @property
    def proposal(self) -> Optional[int]:
        return self.num_decoder_layers if self.two_stage else None

    @property
    def encoder_aux(self) -> range:
        start = self.num_decoder_layers + int(self.two_stage)
        return range(start, start + self.num_encoder_aux)

    def __len__(self) -> int:
        return self.num_decoder_layers + int(self.two_stage) + self.num_encoder_aux

    def role(self, index: int) -> str:
        """ "decoder", "proposal" or "encoder_aux"."""
        if index in self.decoder:
            return "decoder"
        if index == self.proposal:
            return "proposal"
        if index in self.encoder_aux:
            return "encoder_aux"
        raise IndexError(f"head {index} is outside the {len(self)} heads of {self}")


class DetectionHead(NamedTuple):
    """A class head and a box head applied to the same features.

    cls: [..., C] features -> [..., num_classes] logits.
    box: [..., C] features -> [..., 4] box deltas in logit space.
    """

    cls: nn.Module
    box: nn.Module

    def predict(self, features: Tensor, reference: Tensor) -> Prediction:
        """features: [N, Q, C]; reference: [N, Q, 2] points or [N, Q, 4] boxes (normalized) the deltas apply to."""
        return Prediction(self.cls(features), apply_box_delta(self.box(features), reference).sigmoid())


class DetectionHeads:
    """Named views of the heads in `class_embed` / `bbox_embed` (see the module docstring).

    Args:
        class_embed, bbox_embed: the heads, len(layout) each (the same module may appear several times: shared).
        layout: the roles.
    """

    def __init__(self, class_embed: nn.ModuleList, bbox_embed: nn.ModuleList, layout: HeadLayout):
        if len(class_embed) != len(layout) or len(bbox_embed) != len(layout):
            raise ValueError(
                f"{layout} needs {len(layout)} class and box heads, got {len(class_embed)} and {len(bbox_embed)}"
            )
        self.class_embed = class_embed
        self.bbox_embed = bbox_embed
        self.layout = layout

    @classmethod
    def build(cls, hidden_dim: int, num_classes: int, layout: HeadLayout) -> "DetectionHeads":
        """New heads: a Linear class head and a 3-layer MLP box head per index, or one pair for all (`layout.shared`).

        Class heads start at the prior probability (bias -log((1 - p) / p)), box heads at a zero delta. Without
        two-stage, the first decoder layer predicts around reference points, so its box head starts at small boxes
        (w, h logits -2, i.e. 0.12 of the image); two-stage references are boxes already.
        """
        class_head = nn.Linear(hidden_dim, num_classes)
        box_head = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(class_head.bias, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        n = len(layout)
        if layout.shared:
            class_embed = nn.ModuleList([class_head] * n)
            bbox_embed = nn.ModuleList([box_head] * n)
        else:
            class_embed = nn.ModuleList(copy.deepcopy(class_head) for _ in range(n))
            bbox_embed = nn.ModuleList(copy.deepcopy(box_head) for _ in range(n))
        if not layout.two_stage:
            nn.init.constant_(bbox_embed[0].layers[-1].bias[2:], -2.0)
        return cls(class_embed, bbox_embed, layout)

    def _pair(self, index: int) -> DetectionHead:
        return DetectionHead(self.class_embed[index], self.bbox_embed[index])

    @property
    def decoder(self) -> List[DetectionHead]:
        """One head per decoder layer."""
        return [self._pair(i) for i in self.layout.decoder]

    @property
    def proposal(self) -> Optional[DetectionHead]:
        """The head scoring the encoder's proposals (two-stage), else None."""
        index = self.layout.proposal
        return None if index is None else self._pair(index)

    @property
    def encoder_aux(self) -> List[DetectionHead]:
        """One head per encoder layer but the last (encoder aux loss); empty without it."""
        return [self._pair(i) for i in self.layout.encoder_aux]

    def class_head_names(self) -> List[str]:
        """`class_embed.{i}` of every index, every role: a state dict holds a shared head under each index."""
        return [f"class_embed.{i}" for i in range(len(self.class_embed))]

    def module_names(self, role: str) -> List[str]:
        """`class_embed.{i}` / `bbox_embed.{i}` of a role's distinct modules; a module shared with an earlier
        index is named by its first index (the one that holds its parameters in `named_parameters`)."""
        indices = {"decoder": list(self.layout.decoder), "encoder_aux": list(self.layout.encoder_aux)}
        indices["proposal"] = [] if self.layout.proposal is None else [self.layout.proposal]
        names = []
        for attr, heads in (("class_embed", self.class_embed), ("bbox_embed", self.bbox_embed)):
            first = {}
            for i, m in enumerate(heads):
                first.setdefault(id(m), i)
            names += [f"{attr}.{first[id(heads[i])]}" for i in indices[role]]
        return list(dict.fromkeys(names))
