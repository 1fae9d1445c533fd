"""pvtv2: faithful, fast PVTv2 (Pyramid Vision Transformer v2) models for PyTorch."""

from .checkpoints import CheckpointError, convert_state_dict, detect_layout, read_state_dict
from .config import PvtV2Config, list_presets
from .dense import PvtV2ForDepthEstimation, PvtV2ForSemanticSegmentation
from .hub import HubFileNotFound
from .labels import imagenet_id2label
from .modeling import PvtV2Backbone, PvtV2ForImageClassification, PvtV2Model, PvtV2PreTrainedModel
from .outputs import BackboneOutput, BaseModelOutput, ImageClassifierOutput
from .processing import IMAGENET_MEAN, IMAGENET_STD, PvtV2ImageProcessor, load_image

__version__ = "0.1.0"

__all__ = [
    "PvtV2Config",
    "list_presets",
    "PvtV2Model",
    "PvtV2ForImageClassification",
    "PvtV2Backbone",
    "PvtV2ForSemanticSegmentation",
    "PvtV2ForDepthEstimation",
    "PvtV2PreTrainedModel",
    "PvtV2ImageProcessor",
    "load_image",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "imagenet_id2label",
    "BaseModelOutput",
    "ImageClassifierOutput",
    "BackboneOutput",
    "CheckpointError",
    "HubFileNotFound",
    "convert_state_dict",
    "detect_layout",
    "read_state_dict",
]
