"""sere-loss: feature self-relation (SERE) losses for self-supervised transformers.

SERE (Li, Gao, Cheng, TPAMI 2023) adds two terms to DINO, iBOT or MoCo v3 style objectives: the
spatial self-relation of the patches of a view, compared across views on their overlap, and the
channel self-relation of a view. ``SERELoss`` computes both for a multi-crop batch; the kernels
are in ``sere_loss.functional``. ``TokenTap`` takes the patch tokens out of a backbone, and
``update_teacher`` moves the teacher heads of every SERE loss inside a model.
"""

from . import diagnostics, functional
from ._checks import set_value_checks
from .functional import channel_relation_cross_entropy, spatial_relation_cross_entropy
from .heads import PredictionHead, ProjectionHead, RelationHeads
from .losses import ChannelSelfRelationLoss, SERELoss, SpatialSelfRelationLoss, update_teacher
from .sampler import RegionAlignedSampler
from .tap import TokenTap

__version__ = "0.1.0"

__all__ = [
    "ChannelSelfRelationLoss",
    "PredictionHead",
    "ProjectionHead",
    "RegionAlignedSampler",
    "RelationHeads",
    "SERELoss",
    "SpatialSelfRelationLoss",
    "TokenTap",
    "__version__",
    "channel_relation_cross_entropy",
    "diagnostics",
    "functional",
    "set_value_checks",
    "spatial_relation_cross_entropy",
    "update_teacher",
]
