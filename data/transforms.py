"""Image / box preprocessing as in the official `dataloader.py` (`InputProcessor`, `DetectionInputProcessor`)
and `inference.image_preprocess`.

Layouts: images enter as RGB uint8 `[H, W, 3]` (numpy or PIL) and leave as float32 `[3, S_h, S_w]` tensors
normalised `(x - mean_rgb) / stddev_rgb` (x in 0..255) with the model's constants (`EfficientDetConfig.mean_rgb`
/ `stddev_rgb`: ImageNet statistics for D0-D7x, 127 / 128 for Lite; MEAN_RGB / STDDEV_RGB are the D-family
defaults). Boxes are (ymin, xmin, ymax, xmax) ("yxyx") float32 pixels. Normalisation happens before resizing,
so the zero padding at the bottom / right is the mean colour (127 for Lite).

Scalar arithmetic (scales, scaled sizes, offsets) is done in float32 with truncating integer casts, exactly
as the official TF graph does it, so the scaled sizes and `image_scale` agree bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.config import IMAGENET_MEAN_RGB as MEAN_RGB
from model.config import IMAGENET_STDDEV_RGB as STDDEV_RGB

from .autoaugment import AUTOAUGMENT_CHOICES, augment
from .image_io import to_rgb8

_F32 = np.float32


def _size_hw(image_size) -> tuple[int, int]:
    """`int` or `(H, W)` -> `(H, W)` (official `utils.parse_image_size` for ints / tuples)."""
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


def to_uint8_rgb(image) -> np.ndarray:
    """PIL image (any mode, decoded by `data.image_io.to_rgb8`) or uint8 `[H, W, 3]` array -> writable
    contiguous uint8 `[H, W, 3]` RGB array."""
    if isinstance(image, Image.Image):
        return to_rgb8(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image: expected an RGB uint8 array [H, W, 3] or a PIL image, got dtype {array.dtype} "
                         f"shape {tuple(array.shape)}")
    # torch.from_numpy needs a writable array (decoded PIL buffers are read-only)
    return np.ascontiguousarray(array) if array.flags.writeable else array.copy()


def normalize_image(image: np.ndarray, mean_rgb=MEAN_RGB, stddev_rgb=STDDEV_RGB) -> torch.Tensor:
    """uint8 `[H, W, 3]` -> float32 `[3, H, W]`, `(x - mean) / std` (official `InputProcessor.normalize_image`:
    cast, subtract the float32 mean, divide by the float32 std; a scalar applies to every channel)."""
    x = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32)
    mean = torch.as_tensor(mean_rgb, dtype=torch.float32).reshape(-1, 1, 1)
    std = torch.as_tensor(stddev_rgb, dtype=torch.float32).reshape(-1, 1, 1)
    return (x - mean) / std


def resize_bilinear(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`[C, H, W]` -> `[C, h, w]` with `tf.image.resize(method=BILINEAR)` semantics (TF2: half-pixel centres,
    no antialiasing, neighbours clamped to the image) = torch bilinear with `align_corners=False`."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=False)[0]


def _crop_and_pad(image: torch.Tensor, offset_y: int, offset_x: int, output_hw: tuple[int, int]) -> torch.Tensor:
    """Official `resize_and_crop_image` after the resize: crop `[oy:oy+S_h, ox:ox+S_w]`, then
    `tf.image.pad_to_bounding_box(img, 0, 0, S_h, S_w)` (image top-left, zeros bottom / right)."""
    out_h, out_w = output_hw
    image = image[:, offset_y:offset_y + out_h, offset_x:offset_x + out_w]
    return F.pad(image, (0, out_w - image.shape[2], 0, out_h - image.shape[1]))


def _scaled_size(height: int, width: int, scale_y, scale_x) -> tuple[_F32, int, int]:
    """Official aspect-preserving scale: `min(scale_x, scale_y)` in float32, scaled sizes `int(dim * scale)`
    with the float32 product truncated (`tf.cast(..., tf.int32)`)."""
    scale = min(_F32(scale_x), _F32(scale_y))
    return scale, int(_F32(height) * scale), int(_F32(width) * scale)


def preprocess_for_eval(image, image_size, mean_rgb=MEAN_RGB, stddev_rgb=STDDEV_RGB) -> tuple[torch.Tensor, float]:
    """Official inference / eval preprocessing (`inference.image_preprocess`, `set_scale_factors_to_output_size`).

    Args:
        image: RGB uint8 array `[H0, W0, 3]` or a PIL image.
        image_size: network input size S (int) or `(S_h, S_w)`.
        mean_rgb, stddev_rgb: the model's normalisation (`config.mean_rgb`, `config.stddev_rgb`).
    Returns:
        `(tensor [3, S_h, S_w] float32, image_scale)`: the image resized by `scale = min(S_h/H0, S_w/W0)` to
        `(int(H0*scale), int(W0*scale))` at the top-left, zeros elsewhere; `image_scale = 1 / scale` (float32
        division, returned as a Python float) so that network-input px * image_scale = original-image px.
    """
    array = to_uint8_rgb(image)
    out_h, out_w = _size_hw(image_size)
    height, width = array.shape[:2]
    scale, scaled_h, scaled_w = _scaled_size(height, width, _F32(out_h) / _F32(height), _F32(out_w) / _F32(width))
    resized = resize_bilinear(normalize_image(array, mean_rgb, stddev_rgb), (scaled_h, scaled_w))
    return _crop_and_pad(resized, 0, 0, (out_h, out_w)), float(_F32(1.0) / scale)


class TrainTransform:
    """Official training augmentation (`dataloader.InputReader.dataset_parser`, training branch).

    Order, as official: [only with `autoaugment`: the AutoAugment / RandAugment policy of `data/autoaugment.py`
    on the uint8 image and normalised boxes] -> normalise -> random horizontal flip (p = 0.5,
    `preprocessor.random_horizontal_flip`)
    -> random scale `U(jitter_min, jitter_max)` of the output size (`set_training_random_scale_factors`) ->
    bilinear resize of the whole image -> crop at a random offset (non-zero only where the scaled image is
    larger than the output) -> zero pad to the output size. Boxes follow the official `resize_and_crop_boxes`:
    normalised by the image size, flipped as `1 - x`, multiplied by the integer scaled size, shifted by the
    offset, clipped to `[0, S - 1]` (sic: the official clip uses `output_size - 1`), and boxes whose area is
    then zero are dropped with their classes.

    Random draws, in this order from the given `numpy.random.Generator`: the policy's draws (only with
    `autoaugment`), flip (`u > 0.5`, only if `hflip`), scale factor, offset y, offset x (the offsets are always
    drawn, so the stream does not depend on sizes).
    mean_rgb, stddev_rgb: the model's normalisation (`config.mean_rgb`, `config.stddev_rgb`).
    """

    def __init__(self, image_size, jitter_min: float = 0.1, jitter_max: float = 2.0, hflip: bool = True,
                 autoaugment: str | None = None, mean_rgb=MEAN_RGB, stddev_rgb=STDDEV_RGB):
        if autoaugment is not None and autoaugment not in AUTOAUGMENT_CHOICES:
            raise ValueError(f"autoaugment {autoaugment!r}: expected one of {', '.join(AUTOAUGMENT_CHOICES)}")
        self.output_hw, self.autoaugment = _size_hw(image_size), autoaugment
        self.jitter_min, self.jitter_max, self.hflip = float(jitter_min), float(jitter_max), bool(hflip)
        self.mean_rgb, self.stddev_rgb = mean_rgb, stddev_rgb

    def __call__(self, image, boxes, classes, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            image: RGB uint8 `[H, W, 3]` (or PIL).
            boxes: `[K, 4]` yxyx float original-image px (inside the image).
            classes: `[K]` int class indices.
            rng: source of all randomness (the result is a function of the inputs and the rng state).
        Returns:
            image `[3, S_h, S_w]` float32, boxes `[K', 4]` yxyx float32 in network-input px, classes `[K']` int64.
        """
        array = to_uint8_rgb(image)
        height, width = array.shape[:2]
        out_h, out_w = self.output_hw
        boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
        classes = torch.as_tensor(np.asarray(classes, dtype=np.int64).reshape(-1))
        # boxes are normalised to [0, 1] by the image size (official create_coco_tfrecord.py / tf_example_decoder)
        norm = boxes / torch.tensor([height, width, height, width], dtype=torch.float32)
        if self.autoaugment:  # official dataloader.py: on the decoded uint8 image, before normalise and flip
            array, augmented = augment(array, norm.numpy(), self.autoaugment, rng)
            array, norm = np.ascontiguousarray(array), torch.from_numpy(np.array(augmented, dtype=np.float32))
        x = normalize_image(array, self.mean_rgb, self.stddev_rgb)

        if self.hflip and rng.random() > 0.5:  # preprocessor.random_horizontal_flip: uniform > 0.5
            x = x.flip(-1)
            norm = torch.stack([norm[:, 0], 1.0 - norm[:, 3], norm[:, 2], 1.0 - norm[:, 1]], dim=1)

        # dataloader.set_training_random_scale_factors, all in float32 with truncating casts
        factor = _F32(rng.uniform(self.jitter_min, self.jitter_max))
        target_y, target_x = int(factor * _F32(out_h)), int(factor * _F32(out_w))
        _, scaled_h, scaled_w = _scaled_size(height, width, _F32(target_y) / _F32(height),
                                             _F32(target_x) / _F32(width))
        offset_y = int(_F32(max(0, scaled_h - out_h)) * _F32(rng.random()))
        offset_x = int(_F32(max(0, scaled_w - out_w)) * _F32(rng.random()))

        x = _crop_and_pad(resize_bilinear(x, (scaled_h, scaled_w)), offset_y, offset_x, (out_h, out_w))

        # dataloader.resize_and_crop_boxes: scale by the integer scaled size, shift, clip to S - 1, drop area 0
        scaled = norm * torch.tensor([scaled_h, scaled_w, scaled_h, scaled_w], dtype=torch.float32)
        scaled = scaled - torch.tensor([offset_y, offset_x, offset_y, offset_x], dtype=torch.float32)
        limit = torch.tensor([out_h - 1, out_w - 1, out_h - 1, out_w - 1], dtype=torch.float32)
        clipped = torch.minimum(scaled.clamp(min=0.0), limit)
        keep = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1]) != 0
        return x, clipped[keep], classes[keep]
