"""Data: official preprocessing / augmentation, COCO-format datasets, the synthetic shapes dataset."""
from .coco import COCO_CATEGORY_NAMES, CocoDetection, collate_detection
from .shapes import SHAPE_NAMES, make_shapes_dataset
from .transforms import MEAN_RGB, STDDEV_RGB, TrainTransform, preprocess_for_eval, resize_bilinear

__all__ = ["COCO_CATEGORY_NAMES", "CocoDetection", "collate_detection", "SHAPE_NAMES", "make_shapes_dataset",
           "MEAN_RGB", "STDDEV_RGB", "TrainTransform", "preprocess_for_eval", "resize_bilinear"]
