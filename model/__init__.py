"""EfficientDet D0-D7x, faithful to the official TensorFlow implementation (google/automl)."""
from .anchors import AnchorGenerator, BoxCoder
from .config import VARIANTS, EfficientDetConfig, get_config
from .efficientdet import EfficientDet, build_model, flatten_outputs

__all__ = ["AnchorGenerator", "BoxCoder", "EfficientDet", "EfficientDetConfig", "VARIANTS", "build_model",
           "flatten_outputs", "get_config"]
