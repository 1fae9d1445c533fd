"""pvtv2: faithful, fast PVTv2 (Pyramid Vision Transformer v2) models for PyTorch."""

from .data.processing import IMAGENET_MEAN, IMAGENET_STD, PvtV2ImageProcessor, load_image
from .models.config import PvtV2Config, list_presets
from .models.depth import PvtV2ForDepthEstimation
from .models.detection import PvtV2ForObjectDetection
from .models.labels import imagenet_id2label
from .models.modeling import PvtV2Backbone, PvtV2ForImageClassification, PvtV2Model, PvtV2PreTrainedModel
from .models.outputs import BackboneOutput, BaseModelOutput, ImageClassifierOutput
from .models.segmentation import PvtV2ForSemanticSegmentation
from .weights.files import CheckpointError, read_state_dict
from .weights.hub import HubFileNotFound
from .weights.layouts import convert_state_dict, detect_layout

__version__ = "0.1.0"

__all__ = [
    "PvtV2Config",
    "list_presets",
    "PvtV2Model",
    "PvtV2ForImageClassification",
    "PvtV2Backbone",
    "PvtV2ForSemanticSegmentation",
    "PvtV2ForDepthEstimation",
    "PvtV2ForObjectDetection",
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
