"""Torch's thread count beside an engine (`utils.threads`): the detector runs torch's part of an exported
network's pass (the engine call's surroundings, the post-processing) on one thread, and restores the count."""
import pytest
import torch

from eval.evaluator import Detector
from model import build_model
from utils.threads import torch_threads


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_torch_threads_sets_and_restores_even_on_error(two_threads):
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="inside"):
        with torch_threads(1):
            raise RuntimeError("inside")
    assert torch.get_num_threads() == 2


class _Engine:
    """Stands in for an exported network (not an nn.Module): the plain model's outputs, and the torch thread
    count it was called with."""

    def __init__(self, model):
        self.model, self.threads = model, []

    def __call__(self, images):
        self.threads.append(torch.get_num_threads())
        with torch.no_grad():
            return self.model(images)


def test_detector_runs_torch_on_one_thread_beside_an_engine_only(two_threads, monkeypatch):
    model = build_model("efficientdet-d0", num_classes=3).eval()
    images, scales = torch.rand(1, 3, 128, 128), torch.ones(1)
    engine = _Engine(model)
    seen = []
    monkeypatch.setattr("eval.evaluator.postprocess", _recording(seen))
    detections = Detector(model, 128, "infer", "hard", network=engine)(images, scales)
    assert engine.threads == [1] and seen == [1]  # the engine call and the post-processing
    assert torch.get_num_threads() == 2
    plain = Detector(model, 128, "infer", "hard")(images, scales)
    assert seen == [1, 2]  # the torch network keeps the process's threads
    assert detections.boxes.shape == plain.boxes.shape == (1, 100, 4)


def _recording(seen):
    from model.postprocess import postprocess

    def run(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return postprocess(*args, **kwargs)
    return run
