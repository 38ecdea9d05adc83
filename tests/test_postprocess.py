"""Post-processing: exact NMS semantics on hand cases, and parity with the official TF post-processing."""
import math

import pytest
import torch

from conftest import record_delta
from model import AnchorGenerator, build_model, flatten_outputs
from model.efficientdet import anchor_rows
from model import postprocess as post
from model import nms as nms_impl
from model.nms import nms
from model.postprocess import eval_candidates, infer_candidates, postprocess, select_detections
from parity.checks import ported_model

BOX_TOL, SCORE_TOL = 0.1, 1e-4  # px, score (issue 4)


def _boxes(*rows):
    return torch.tensor([rows], dtype=torch.float32)


def test_soft_nms_decays_by_gaussian_of_iou():
    boxes = _boxes([0, 0, 10, 10], [0, 5, 10, 15], [50, 50, 60, 60])  # IoU(0, 1) = 1/3
    scores = torch.tensor([[0.9, 0.8, 0.7]])
    selected, rank = nms(boxes, scores, torch.zeros(1, 3, dtype=torch.long), 1, 10, "soft")
    assert rank.tolist() == [[0, 2, 1]]  # the decayed box falls behind the untouched one
    assert selected[0, 1].item() == pytest.approx(0.8 * math.exp(-(1 / 3) ** 2 / 0.5), rel=1e-6)
    assert selected[0, 2].item() == pytest.approx(0.7)


def test_soft_nms_drops_at_score_threshold_and_never_hard_suppresses():
    boxes = _boxes([0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10])  # identical: IoU 1, decay e^-2
    scores = torch.tensor([[0.9, 0.5, 0.0011]])
    selected, rank = nms(boxes, scores, torch.zeros(1, 3, dtype=torch.long), 1, 10, "soft")
    assert rank[0, 1] == 1 and selected[0, 1].item() == pytest.approx(0.5 * math.exp(-2.0), rel=1e-6)
    assert rank[0, 2] == 10 and selected[0, 2] == 0  # 0.0011 * e^-2 <= 0.001: dropped


def test_hard_nms_threshold_and_groups():
    # IoU(0,1) = 0.43 and IoU(0,2) = 0.25 survive box 0, but IoU(1,2) = 0.67 then suppresses box 2.
    boxes = _boxes([0, 0, 10, 10], [0, 4, 10, 14], [0, 6, 10, 16])
    boxes = torch.cat([boxes, _boxes([0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 1, 1])])  # IoU(0,1) = 0.9
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.9, 0.8, 0.7]])
    groups = torch.tensor([[0, 0, 0], [0, 1, 0]])  # image 1: box 1 is another class, never suppressed
    selected, rank = nms(boxes, scores, groups, 2, 10, "hard")
    assert (rank[0] < 10).tolist() == [True, True, False]
    assert (rank[1] < 10).tolist() == [True, True, True]
    selected, rank = nms(boxes, scores, torch.zeros_like(groups), 1, 10, "hard")
    assert (rank[1] < 10).tolist() == [True, False, True]


@pytest.mark.parametrize("num_groups", [1, 7])
def test_hard_nms_prefix_equals_full_greedy_loop(num_groups, monkeypatch):
    """`_hard_nms` (torchvision on a growing prefix) makes the same final choice as the vectorised loop over
    all candidates: the 1500 best boxes pile up on 5 spots (so the first prefixes, 256 and 1024, yield too few),
    duplicated scores, empty boxes. The candidates carry 7 classes either way: with one group (NMS across
    classes) each detection must still keep the class of its own candidate."""
    import torchvision
    g = torch.Generator().manual_seed(num_groups)
    n, k = 3, 3000
    centre = torch.rand(n, k, 2, generator=g) * 200
    centre[:, :1500] = torch.rand(n, 5, 2, generator=g).repeat_interleave(300, 1) * 200 + torch.rand(n, 1500, 2)
    size = torch.rand(n, k, 2, generator=g) * 10 + 30
    boxes = torch.cat([centre - size / 2, centre + size / 2], -1)
    boxes[:, 1500:1520, 2:] = boxes[:, 1500:1520, :2]  # empty boxes
    scores = (torch.rand(n, k, generator=g) * 50).round() / 50  # many exact ties
    scores[:, :1500] += 1
    classes = torch.randint(0, 7, (n, k), generator=g)
    groups = classes if num_groups > 1 else torch.zeros_like(classes)
    calls = []
    monkeypatch.setattr(torchvision.ops, "nms", lambda *a: calls.append(len(a[0])) or torchvision.ops.boxes.nms(*a))
    fast = select_detections(boxes, scores, classes, torch.ones(n), per_class=num_groups > 1, method="hard")
    assert len(calls) > n and max(calls) > 1500  # the prefix had to grow
    full = nms_impl._greedy_nms(boxes, scores, groups, num_groups, 100, "hard", 0.5, 0.001, 0.5)
    loop = nms_impl.top_selected(*full, groups, 100, 100)
    assert torch.equal(fast.boxes, boxes.gather(1, loop[0][..., None].expand(n, 100, 4)))
    assert fast.classes.unique().numel() == 7  # detections of every class: a wrong pick would show
    assert torch.equal(fast.classes, classes.gather(1, loop[0]))
    assert bool(loop[1].all()) and torch.equal(fast.num_valid, torch.full((n,), 100))


def test_nms_ties_go_to_lowest_index_and_batches_are_independent():
    boxes = torch.cat([_boxes([0, 0, 10, 10], [0, 0, 10, 10]), _boxes([0, 0, 10, 10], [20, 20, 30, 30])])
    scores = torch.tensor([[0.5, 0.5], [0.3, 0.6]])
    selected, rank = nms(boxes, scores, torch.zeros(2, 2, dtype=torch.long), 1, 5, "soft")
    assert rank[0].tolist() == [0, 1] and rank[1].tolist() == [1, 0]
    single, _ = nms(boxes[1:], scores[1:], torch.zeros(1, 2, dtype=torch.long), 1, 5, "soft")
    assert torch.equal(single[0], selected[1])


def test_select_detections_pads_orders_and_scales():
    boxes = _boxes([0, 0, 10, 10], [-5, 0, 600, 10])
    dets = select_detections(boxes, torch.tensor([[0.2, 0.9]]), torch.tensor([[3, 1]]), torch.tensor([2.0]),
                             per_class=False, clip_size=(512, 512), max_detections=4)
    assert dets.num_valid.tolist() == [2] and dets.classes[0].tolist() == [1, 3, 0, 0]
    assert dets.boxes[0, 0].tolist() == [0, 0, 1024, 20]  # clipped to the 512 frame, then x2
    assert dets.scores[0, 2:].tolist() == [0, 0]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="nms method 'fast': expected 'soft' or 'hard'"):
        nms(_boxes([0, 0, 1, 1]), torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.long), 1, 1, "fast")
    with pytest.raises(ValueError, match="post-processing mode 'x'"):
        postprocess([torch.zeros(1, 9, 1, 1)], [torch.zeros(1, 36, 1, 1)], torch.zeros(9, 4), torch.ones(1),
                    (128, 128), mode="x")


# ----------------------------------------------------------- parity with the official TF post-processing

@pytest.fixture(scope="module")
def ref(reference):
    return {k: torch.from_numpy(v) for k, v in reference.items()}


def _assert_rows(dets, ref, prefix, label):
    n = int(ref[prefix + "num_valid"][0])
    assert int(dets.num_valid[0]) == n
    assert torch.equal(dets.classes[0, :n] + 1, ref[prefix + "classes"][0, :n].long())
    assert record_delta(f"{label} boxes (px)", dets.boxes[0, :n], ref[prefix + "boxes"][0, :n], BOX_TOL) <= BOX_TOL
    assert record_delta(f"{label} scores", dets.scores[0, :n], ref[prefix + "scores"][0, :n], SCORE_TOL) <= SCORE_TOL


@pytest.mark.parametrize("method, prefix", [("soft", "det_"), ("hard", "det_hard_")])
def test_infer_nms_on_official_candidates(ref, method, prefix):
    dets = select_detections(ref["prenms_boxes"], ref["prenms_scores"], ref["prenms_classes"].long(),
                             ref["image_scale"], per_class=False, method=method, clip_size=(512, 512))
    _assert_rows(dets, ref, prefix, f"NMS on TF candidates, infer {method}")


def test_eval_nms_on_official_candidates(ref):
    dets = select_detections(ref["eval_topk_boxes"], torch.sigmoid(ref["eval_topk_logits"]),
                             ref["eval_topk_classes"].long(), ref["image_scale"], per_class=True, method="soft")
    _assert_rows(dets, ref, "eval_det_", "NMS on TF candidates, eval soft")


@pytest.fixture(scope="module")
def head_outputs(fixture_dir, input_nchw):
    with torch.no_grad():
        return ported_model(fixture_dir / "model", "efficientdet-d0", ema=True).eval()(input_nchw)


@pytest.fixture(scope="module")
def anchors():
    return AnchorGenerator.from_config(build_model("efficientdet-d0").config)((512, 512))


def test_candidates_from_our_head_outputs(head_outputs, anchors, ref):
    logits, deltas = flatten_outputs(*head_outputs)
    boxes, scores, classes = infer_candidates(logits, deltas, anchors)
    assert record_delta("prenms_boxes (px)", boxes, ref["prenms_boxes"], BOX_TOL) <= BOX_TOL
    assert record_delta("prenms_scores", scores, ref["prenms_scores"], SCORE_TOL) <= SCORE_TOL
    # Classes agree except where the two best logits of an anchor are closer than our logit error.
    top2 = logits[0].topk(2, -1).values
    differ = classes[0] != ref["prenms_classes"][0].long()
    assert differ.sum() <= 5 and (differ.sum() == 0 or (top2[differ, 0] - top2[differ, 1]).max() < 1e-3)

    # Eval path: the top-5000 (anchor, class) pairs are the official ones, up to swaps at the boundary.
    flat = logits.reshape(1, -1).topk(5000).indices[0]
    ours = set(zip((flat // 90).tolist(), (flat % 90).tolist()))
    theirs = set(zip(ref["eval_topk_anchor_indices"][0].tolist(), ref["eval_topk_classes"][0].tolist()))
    boundary = ref["eval_topk_logits"][0, -1].item()
    assert len(ours ^ theirs) <= 10
    assert all(abs(logits[0, a, c].item() - boundary) < 1e-3 for a, c in ours ^ theirs)
    boxes, _, classes = eval_candidates(logits, deltas, anchors)
    assert classes.shape == (1, 5000) and boxes.shape == (1, 5000, 4)


def test_eval_path_end_to_end(head_outputs, anchors, ref):
    dets = postprocess(*head_outputs, anchors, ref["image_scale"], (512, 512), mode="eval", method="soft")
    _assert_rows(dets, ref, "eval_det_", "end to end, eval soft")


@pytest.mark.parametrize("method, prefix", [("soft", "det_"), ("hard", "det_hard_")])
def test_infer_path_end_to_end(head_outputs, anchors, ref, method, prefix):
    """Our logits differ from TF's by ~1e-4, so two candidates whose scores are that close when one of them is
    selected may swap (the fixture README's near-ties); a swap changes the soft-NMS decay of just those rows.
    Every official detection must be found (same class, box within 0.1 px), nearly all in place with the
    official score, and any row out of place must sit within 0.005 of the score of the official row there."""
    dets = postprocess(*head_outputs, anchors, ref["image_scale"], (512, 512), mode="infer", method=method)
    n = int(ref[prefix + "num_valid"][0])
    assert int(dets.num_valid[0]) == n
    boxes, classes, scores = dets.boxes[0], dets.classes[0] + 1, dets.scores[0]
    ref_boxes, ref_classes, ref_scores = ref[prefix + "boxes"][0], ref[prefix + "classes"][0], ref[prefix + "scores"][0]
    in_place = 0
    for i in range(n):
        same = (classes == ref_classes[i]) & ((boxes - ref_boxes[i]).abs().amax(1) <= BOX_TOL)
        assert same.any(), f"official detection {i} not found"
        if same[i]:
            in_place += 1
            assert abs(scores[i] - ref_scores[i]) <= SCORE_TOL, i
        else:
            assert abs(scores[i] - ref_scores[i]) <= 5e-3, i
    assert in_place >= n - 5


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "bf16"])
@pytest.mark.parametrize("method", ["soft", "hard"])
def test_infer_path_equals_candidates_then_selection(layout, method):
    """`postprocess(mode="infer")` reduces the logits level by level and finds classes only for the selected
    anchors; it must give exactly `select_detections(infer_candidates(...))` on the concatenated outputs, for
    any layout and dtype, with tied best logits (argmax: first class) and plenty of overlapping boxes."""
    g = torch.Generator().manual_seed(0)
    num_anchors, num_classes, sizes = 9, 6, [(16, 16), (8, 8), (4, 4)]
    cls_outs = [torch.randn(2, num_anchors * num_classes, h, w, generator=g).round(decimals=1) for h, w in sizes]
    box_outs = [0.3 * torch.randn(2, num_anchors * 4, h, w, generator=g) for h, w in sizes]
    if layout != "nchw":
        cls_outs = [c.contiguous(memory_format=torch.channels_last) for c in cls_outs]
        box_outs = [b.contiguous(memory_format=torch.channels_last) for b in box_outs]
    if layout == "bf16":
        cls_outs, box_outs = [c.bfloat16() for c in cls_outs], [b.bfloat16() for b in box_outs]
    config = build_model("efficientdet-d0", num_classes=num_classes, min_level=3, max_level=5).config
    anchors = AnchorGenerator.from_config(config)((128, 128))
    scales = torch.tensor([1.0, 2.5])
    dets = postprocess(cls_outs, box_outs, anchors, scales, (128, 128), mode="infer", method=method)
    logits, deltas = flatten_outputs(cls_outs, box_outs)
    assert (logits.float().topk(2, -1).values.diff(dim=-1) == 0).any()  # the case of ties is exercised
    expected = select_detections(*infer_candidates(logits.float(), deltas.float(), anchors), scales,
                                 per_class=False, method=method, clip_size=(128, 128))
    assert int(dets.num_valid.min()) > 10
    for name in ("boxes", "scores", "classes", "num_valid"):
        assert torch.equal(getattr(dets, name), getattr(expected, name)), name


@pytest.mark.parametrize("num_classes", [3, 17, 90, 91])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_best_logits_equal_amax(num_classes, layout):
    """The infer path's best logit per anchor (halves first, then ATen's reduction, on the outputs' own
    layout) is `amax` over the anchor rows, bit for bit, for even and odd class counts; a NaN logit still makes
    its anchor NaN."""
    out = torch.randn(2, 9 * num_classes, 5, 7, generator=torch.Generator().manual_seed(num_classes))
    out[1, 3 * num_classes - 1, 2, 4] = float("nan")  # anchor 2 at (2, 4): row (2 * 7 + 4) * 9 + 2
    if layout == "channels_last":
        out = out.contiguous(memory_format=torch.channels_last)
    ours = post._best_logits(out, num_classes)
    expected = anchor_rows(out, num_classes).amax(-1)
    assert torch.equal(ours.isnan(), expected.isnan()) and bool(ours[1, (2 * 7 + 4) * 9 + 2].isnan())
    assert torch.equal(ours.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_top_pairs_by_level_equal_top_pairs_of_the_anchor_rows(layout):
    """The evaluation path's top pairs, gathered level by level in the outputs' own layout, are the best pairs
    of the concatenated anchor rows in TF's `top_k` order (value, then the lower `anchor * C + class` index
    first), ties (many here) included."""
    g = torch.Generator().manual_seed(5)
    outs = [(torch.randn(2, 9 * 6, s, s + 1, generator=g) * 4).round() / 4 for s in (16, 8, 4, 2, 1)]
    if layout == "channels_last":
        outs = [o.contiguous(memory_format=torch.channels_last) for o in outs]
    logits = torch.cat([anchor_rows(o, 6) for o in outs], 1)
    values, flat = post._top_pairs_by_level(outs, 6, 300)
    pairs = logits.reshape(2, -1)  # reference: all pairs stably sorted by value (ties: lower index first)
    order = pairs.argsort(dim=1, descending=True, stable=True)[:, :300]
    assert torch.equal(values, pairs.gather(1, order)) and torch.equal(flat, order)
    assert torch.equal(post._top_pairs(logits, 300)[1], flat)  # the flattened path agrees
    assert post._top_pairs_by_level(outs, 6, logits.shape[1] + 1) is None  # more pairs than anchors


@pytest.mark.parametrize("spread", ["ties", "trained-like"])
def test_soft_nms_stops_once_the_best_100_are_settled(spread):
    """`best_of=100` (what both paths keep) ends the soft-NMS loop early and gives the same best 100, order and
    ties included: scores rounded to 1/50 (many exact ties across groups) or spread as a trained model's."""
    g = torch.Generator().manual_seed(11)
    n, k, groups_count = 2, 3000, 7
    centre = torch.rand(n, k, 2, generator=g) * 400
    boxes = torch.cat([centre - 10, centre + 10], -1)
    scores = torch.rand(n, k, generator=g)
    scores = (scores * 50).round() / 50 if spread == "ties" else scores ** 8
    groups = torch.randint(0, groups_count, (n, k), generator=g)
    full = nms(boxes, scores, groups, groups_count, 100, "soft")
    early = nms(boxes, scores, groups, groups_count, 100, "soft", best_of=100)
    assert int((early[1] < 100).sum()) < int((full[1] < 100).sum())  # it did stop early
    for a, b in zip(nms_impl.top_selected(*full, groups, 100, 100), nms_impl.top_selected(*early, groups, 100, 100)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("crowded", [False, True], ids=["prefix-enough", "prefix-grows"])
def test_single_group_soft_nms_on_a_prefix_equals_the_full_loop(crowded, monkeypatch):
    """The image path's soft-NMS runs on the best 1024 candidates first: the same 100 selections as the loop over
    all 6000, in order, with exact score ties; when the best 1500 crowd on 5 spots (decaying each other below
    the boxes left out), the prefix has to grow and still gives the loop's answer."""
    g = torch.Generator().manual_seed(13)
    n, k = 2, 6000
    centre = torch.rand(n, k, 2, generator=g) * 600
    if crowded:
        centre[:, :1500] = torch.rand(n, 5, 2, generator=g).repeat_interleave(300, 1) * 600 + torch.rand(n, 1500, 2)
    boxes = torch.cat([centre - 15, centre + 15], -1)
    scores = (torch.rand(n, k, generator=g) * 200).round() / 200
    if crowded:  # the best 1500 (all of the first prefix) crowd on 5 spots: 5 selections, then decayed to ~0.16
        scores[:, :1500] = scores[:, :1500] * 0.01 + 0.99
        scores[:, 1500:] *= 0.9
    groups = torch.zeros(n, k, dtype=torch.long)
    sizes = []
    greedy = nms_impl._greedy_nms
    monkeypatch.setattr(nms_impl, "_greedy_nms", lambda b, *a: sizes.append(b.shape[1]) or greedy(b, *a))
    fast = nms(boxes, scores, groups, 1, 100, "soft")
    full = greedy(boxes, scores, groups, 1, 100, "soft", 0.5, 0.001, 0.5)
    assert (max(sizes) > 1024) == crowded and min(sizes) == 1024
    for a, b in zip(nms_impl.top_selected(*fast, groups, 100, 100), nms_impl.top_selected(*full, groups, 100, 100)):
        assert torch.equal(a, b)
    assert torch.equal(fast[0] > 0, full[0] > 0)  # the very same 100 boxes selected, nothing else


def test_top_k_orders_ties_as_tf_top_k():
    """Equal values come lowest index first, also at the k-th place, whatever order the candidates arrive in
    (reference: a stable sort of all of them by value after sorting by index)."""
    g = torch.Generator().manual_seed(17)
    index = torch.randperm(5000, generator=g)
    values = torch.randint(0, 40, (5000,), generator=g).float()
    ours = post._top_k(values, index, 777)
    by_index = index.argsort()
    ref = by_index[values[by_index].argsort(descending=True, stable=True)][:777]
    assert torch.equal(ours[1], index[ref]) and torch.equal(ours[0], values[ref])


def test_per_class_hard_nms_prefix_is_not_cut_inside_a_tie():
    """With several groups a candidate left out of the prefix that ties its last score can still come first (a
    lower group wins the tie in `top_selected`): the prefix keeps the whole run of equal scores."""
    boxes = torch.tensor([[[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]]])
    scores = torch.tensor([[0.9, 0.5, 0.5]])
    groups = torch.tensor([[1, 1, 0]])
    fast = nms_impl._hard_nms(boxes, scores, groups, 2, 2, 0.5, prefix=2)
    full = nms_impl._greedy_nms(boxes, scores, groups, 2, 2, "hard", 0.5, 0.001, 0.5)
    assert torch.equal(nms_impl.top_selected(*fast, groups, 2, 2)[0], nms_impl.top_selected(*full, groups, 2, 2)[0])
    assert nms_impl.top_selected(*fast, groups, 2, 2)[0].tolist() == [[0, 2]]


def test_top_pairs_of_tiny_inputs_with_nan_logits_do_not_fail():
    """More pairs wanted than anchors (tiny inputs) and a NaN logit: k rows come back, as torch's top-k gives."""
    logits = torch.randn(1, 20, 3, generator=torch.Generator().manual_seed(3))
    logits[0, 4, 1] = float("nan")
    values, flat = post._top_pairs(logits, 50)
    assert values.shape == flat.shape == (1, 50) and int(flat.unique().numel()) == 50
