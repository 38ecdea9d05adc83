"""torch.hub entry points: `torch.hub.load(REPO_DIR, "efficientdet_d0", source="local", weights="my.pth")`
works from any working directory (torch.hub puts this folder on `sys.path` while it loads).

One entry point per variant of the variant table (`model.config.VARIANTS`), generated from it, named with `_`
for `-` (efficientdet_d0 ... efficientdet_d7x, efficientdet_lite0 ...). Each returns the model in eval mode:

* `weights=PATH`: a `.pth` written by the porter (`python -m utils.port_tf`) or by training (`best.pth`,
  `last.pth`: its EMA weights); the number of classes and the class names come from the file
  (`model.class_names`, None if the file has none).
* `pretrained=True`: the official COCO weights, `weights/<model>.pth` of this repository or of
  `$EFFICIENTDET_WEIGHTS_DIR` (ported from `<model>/` there if only the TF checkpoint is there).
* neither: random initialisation with `num_classes` classes (default 90, COCO's label space). With weights the
  file sets the classes: `num_classes` there is an error, not silently ignored.

`predictor=True` (with `weights=` or `pretrained=True`) returns an `eval.predictor.Predictor` of those weights
instead: images in, boxes out (`.predict("photo.jpg")`), as `-mode infer` detects them; further keywords are
its options (device, precision, backend, exported, image_size, nms, compile, batch_size, tta).
"""

dependencies = ["torch", "torchvision", "numpy", "PIL", "pycocotools"]


def _entry_point(model_name: str):
    def load(weights: str | None = None, pretrained: bool = False, num_classes: int | None = None,
             predictor: bool = False, **options):
        from model import build_model
        from utils.pretrained import resolve_pretrained
        from utils.weights import detector_from_weights

        if weights is not None and pretrained:
            raise ValueError(f"{model_name}: give weights=PATH or pretrained=True, not both")
        if num_classes is not None and (weights is not None or pretrained):
            raise ValueError(f"{model_name}: num_classes={num_classes} is for random initialisation; the weights "
                             f"set the classes (to train other classes, use main.py -mode train --weights)")
        if options and not predictor:
            raise TypeError(f"{model_name}: unexpected keyword(s) {', '.join(sorted(options))} (Predictor options: "
                            f"give them with predictor=True)")
        if pretrained:
            weights = resolve_pretrained(model_name)  # the weights folder: see utils.pretrained.default_weights_dir
        if predictor:
            from eval.predictor import Predictor
            if weights is None:
                raise ValueError(f"{model_name}: predictor=True needs weights=PATH or pretrained=True")
            return Predictor.from_weights(weights, model_name, **options)
        if weights is None:
            model = build_model(model_name, num_classes=90 if num_classes is None else num_classes)
            model.class_names = None
        else:
            model, info = detector_from_weights(weights, model_name, "weights=")
            model.class_names = info["class_names"]
        return model.eval()

    load.__name__ = load.__qualname__ = model_name.replace("-", "_")
    load.__doc__ = (f"{model_name} (EfficientDet, official TF layout), eval mode: `weights` = a .pth of this "
                    f"project, `pretrained=True` = weights/{model_name}.pth, else random init with `num_classes`; "
                    f"`predictor=True`: an eval.predictor.Predictor of the weights instead (keywords: its options).")
    return load


def _variant_names() -> list[str]:
    from model.config import VARIANTS
    return list(VARIANTS)


globals().update({name.replace("-", "_"): _entry_point(name) for name in _variant_names()})
