"""Tests of the per-image inference functions: golden parity (case 6) and hand-made cases."""

import numpy as np
import pytest
import torch
from conftest import load_golden

from detectron2.structures import BitMasks, Instances
from mask_former.modeling import postprocessing
from mask_former.modeling.postprocessing import (
    instance_inference,
    masks_to_boxes,
    panoptic_inference,
    sem_seg_postprocess,
    semantic_inference,
    upsample_mask_logits,
)

# Logit given to a query's class in the hand-made cases; softmax over 4-6 columns gives > 0.999.
CONFIDENT = 10.0
# Mask logits whose sigmoid is ~1 / ~0 (sigmoid(8) = 0.99966).
ON, OFF = 8.0, -8.0


@pytest.fixture(scope="module")
def golden():
    return load_golden("inference.pt")


def _class_logits(classes, num_classes, confidence=CONFIDENT):
    """[Q, K + 1] logits, query q confident about classes[q] (num_classes means no object)."""
    logits = torch.zeros(len(classes), num_classes + 1)
    logits[torch.arange(len(classes)), torch.tensor(classes)] = confidence
    return logits


def _mask_logits(rows_per_query, height=2):
    """[Q, height, W] logits: every row of query q equals rows_per_query[q]."""
    rows = torch.tensor(rows_per_query, dtype=torch.float32)
    return rows[:, None, :].expand(-1, height, -1).contiguous()


def _panoptic(mask_cls, mask_pred, num_classes, thing_ids, m2f, overlap=0.8):
    return panoptic_inference(
        mask_cls,
        mask_pred,
        num_classes=num_classes,
        thing_ids=thing_ids,
        object_mask_threshold=0.8,
        overlap_threshold=overlap,
        mask_threshold_pixels=m2f,
    )


def _numpy_boxes(masks):
    """Tight XYXY boxes (exclusive right/bottom), zero for empty masks, via numpy."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for i, mask in enumerate(np.asarray(masks) > 0):
        ys, xs = np.nonzero(mask)
        if len(ys):
            boxes[i] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return boxes


# ------------------------------------------------------------------------------------------------
# semantic


def test_semantic_matches_golden(golden):
    out = semantic_inference(golden["mask_cls"], golden["mask_pred"])
    assert out.shape == golden["semantic"].shape
    torch.testing.assert_close(out, golden["semantic"], atol=1e-5, rtol=0)


def test_semantic_matches_einsum_on_odd_and_strided_inputs():
    mask_cls = torch.randn(9, 8)
    mask_pred = torch.randn(9, 23, 17) * 3
    expected = torch.einsum("qc,qhw->chw", mask_cls.softmax(-1)[:, :-1], mask_pred.sigmoid())
    torch.testing.assert_close(semantic_inference(mask_cls, mask_pred), expected, atol=1e-5, rtol=0)
    # A cropped (non-contiguous) and a transposed view must give the same numbers.
    padded = torch.randn(9, 30, 20)
    padded[:, :23, :17] = mask_pred
    torch.testing.assert_close(
        semantic_inference(mask_cls, padded[:, :23, :17]), expected, atol=1e-5, rtol=0
    )
    transposed = mask_pred.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(
        semantic_inference(mask_cls, transposed), expected, atol=1e-5, rtol=0
    )


def test_semantic_blocks_equal_one_product():
    # More pixels than one CPU block, with a partial last block: every block's values must be the
    # ones a single matrix product gives (same dot products over the queries).
    torch.manual_seed(0)
    mask_cls = torch.randn(30, 12)
    mask_pred = torch.randn(30, 61, 97) * 4
    assert 61 * 97 > 2 * postprocessing._SEMANTIC_BLOCK and 61 * 97 % postprocessing._SEMANTIC_BLOCK
    class_probs = mask_cls.softmax(-1)[:, :-1]
    one_product = (class_probs.t() @ mask_pred.flatten(1).sigmoid()).view(-1, 61, 97)
    out = semantic_inference(mask_cls, mask_pred)
    torch.testing.assert_close(out, one_product, atol=1e-6, rtol=0)
    expected = torch.einsum("qc,qhw->chw", class_probs, mask_pred.sigmoid())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_semantic_hand_computed():
    # One query, class probs softmax([0, ln 3, 0]) = [0.2, 0.6, 0.2]; no-object column dropped.
    mask_cls = torch.tensor([[0.0, float(np.log(3.0)), 0.0]])
    mask_pred = torch.tensor([[[0.0, 20.0]]])
    expected = torch.tensor([[[0.1, 0.2]], [[0.3, 0.6]]])
    torch.testing.assert_close(semantic_inference(mask_cls, mask_pred), expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# panoptic: golden


@pytest.mark.parametrize(
    "key, m2f", [("panoptic_maskformer", False), ("panoptic_mask2former", True)]
)
def test_panoptic_matches_golden(golden, key, m2f):
    panoptic_seg, segments_info = panoptic_inference(
        golden["mask_cls"],
        golden["mask_pred"],
        num_classes=golden["num_classes"],
        thing_ids=golden["metadata_thing_dataset_id_to_contiguous_id"].values(),
        object_mask_threshold=golden["object_mask_threshold"],
        overlap_threshold=golden["overlap_threshold"],
        mask_threshold_pixels=m2f,
    )
    assert panoptic_seg.dtype == torch.int32
    assert torch.equal(panoptic_seg, golden[key]["panoptic_seg"])
    assert segments_info == golden[key]["segments_info"]
    for info in segments_info:
        assert type(info["isthing"]) is bool and type(info["category_id"]) is int


def test_panoptic_rules_give_different_maps_on_golden(golden):
    # Guards the test above against both rules silently doing the same thing.
    mf = golden["panoptic_maskformer"]["panoptic_seg"]
    m2f = golden["panoptic_mask2former"]["panoptic_seg"]
    assert (m2f == 0).sum() > (mf == 0).sum()


# ------------------------------------------------------------------------------------------------
# panoptic: hand-made cases (2 x 4 images, every row identical)


@pytest.mark.parametrize("m2f", [False, True])
def test_panoptic_no_kept_query(m2f):
    # q0 is no-object, q1 is not confident enough (softmax of all-equal logits = 0.25).
    mask_cls = torch.stack([_class_logits([3], 3)[0], torch.zeros(4)])
    mask_pred = _mask_logits([[ON] * 4, [ON] * 4])
    panoptic_seg, segments_info = _panoptic(mask_cls, mask_pred, 3, {0}, m2f)
    assert panoptic_seg.dtype == torch.int32
    assert torch.equal(panoptic_seg, torch.zeros(2, 4, dtype=torch.int32))
    assert segments_info == []


@pytest.mark.parametrize("m2f", [False, True])
def test_panoptic_stuff_of_one_class_is_merged(m2f):
    # Classes: 0 thing, 1 and 2 stuff. q1 and q2 are both stuff class 1; q3 is no-object.
    mask_cls = _class_logits([0, 1, 1, 3], 3)
    mask_pred = _mask_logits(
        [[ON, OFF, OFF, OFF], [OFF, ON, ON, OFF], [OFF, OFF, OFF, ON], [ON, ON, ON, ON]]
    )
    panoptic_seg, segments_info = _panoptic(mask_cls, mask_pred, 3, {0}, m2f)
    assert panoptic_seg.tolist() == [[1, 2, 2, 2], [1, 2, 2, 2]]
    assert segments_info == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": False, "category_id": 1},
    ]


def test_panoptic_things_of_one_class_are_not_merged():
    mask_cls = _class_logits([0, 0, 2, 2], 3)
    mask_pred = _mask_logits(
        [[ON, OFF, OFF, OFF], [OFF, ON, OFF, OFF], [OFF, OFF, ON, OFF], [OFF, OFF, OFF, ON]]
    )
    panoptic_seg, segments_info = _panoptic(mask_cls, mask_pred, 3, {0, 1}, False)
    assert panoptic_seg.tolist() == [[1, 2, 3, 3], [1, 2, 3, 3]]
    assert segments_info == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": True, "category_id": 0},
        {"id": 3, "isthing": False, "category_id": 2},
    ]


@pytest.mark.parametrize("m2f", [False, True])
def test_panoptic_overlap_threshold_drops_a_covered_segment(m2f):
    # q1 (stuff 2) has prob 0.88 everywhere but wins the argmax only in column 3: ratio 2/8.
    mask_cls = _class_logits([0, 2], 3)
    mask_pred = _mask_logits([[ON, ON, ON, OFF], [2.0, 2.0, 2.0, 2.0]])
    panoptic_seg, segments_info = _panoptic(mask_cls, mask_pred, 3, {0}, m2f, overlap=0.8)
    assert panoptic_seg.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    assert segments_info == [{"id": 1, "isthing": True, "category_id": 0}]

    panoptic_seg, segments_info = _panoptic(mask_cls, mask_pred, 3, {0}, m2f, overlap=0.2)
    assert panoptic_seg.tolist() == [[1, 1, 1, 2], [1, 1, 1, 2]]
    assert segments_info == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": False, "category_id": 2},
    ]


def test_panoptic_mask2former_rule_leaves_low_probability_pixels_void():
    # The only kept query wins every pixel but has prob 0.27 in columns 2-3.
    mask_cls = _class_logits([0, 3], 3)
    mask_pred = _mask_logits([[ON, ON, -1.0, -1.0], [ON, ON, ON, ON]])
    mf_seg, mf_info = _panoptic(mask_cls, mask_pred, 3, {0}, False)
    m2f_seg, m2f_info = _panoptic(mask_cls, mask_pred, 3, {0}, True)
    assert mf_seg.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert m2f_seg.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert mf_info == m2f_info == [{"id": 1, "isthing": True, "category_id": 0}]


def test_panoptic_mask2former_ratio_uses_the_full_argmax_area():
    # q0 (thing 0): prob >= 0.5 in columns 0-1 (area 4); it wins the argmax in columns 0, 2, 3
    # (area 6) but only column 0 is >= 0.5 there (area 2). The published Mask2Former ratio is
    # 6 / 4 >= 0.8, so q0 is kept with column 0 only (a ratio over the restricted area, 2 / 4,
    # would drop it). q1 (stuff 1) wins column 1.
    mask_cls = _class_logits([0, 1], 3)
    mask_pred = _mask_logits([[ON, 0.5, -1.0, -1.0], [OFF, ON, OFF, OFF]])
    m2f_seg, m2f_info = _panoptic(mask_cls, mask_pred, 3, {0}, True)
    assert m2f_seg.tolist() == [[1, 2, 0, 0], [1, 2, 0, 0]]
    assert m2f_info == [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": False, "category_id": 1},
    ]
    mf_seg, _ = _panoptic(mask_cls, mask_pred, 3, {0}, False)
    assert mf_seg.tolist() == [[1, 2, 1, 1], [1, 2, 1, 1]]


def test_panoptic_query_without_high_probability_pixels_is_skipped():
    # q0 wins columns 2-3 with prob 0.27 < 0.5 everywhere: original area 0, so no segment.
    mask_cls = _class_logits([0, 1], 3)
    mask_pred = _mask_logits([[OFF, OFF, -1.0, -1.0], [ON, ON, OFF, OFF]])
    panoptic_seg, segments_info = _panoptic(mask_cls, mask_pred, 3, {0}, False)
    assert panoptic_seg.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert segments_info == [{"id": 1, "isthing": False, "category_id": 1}]


def test_panoptic_rejects_wrong_num_classes():
    with pytest.raises(ValueError):
        _panoptic(torch.zeros(2, 4), torch.zeros(2, 2, 2), 4, {0}, False)


def _reference_panoptic(mask_cls, mask_pred, num_classes, thing_ids, m2f, overlap):
    """The rules written as a plain per-query loop that paints one segment at a time."""
    scores, labels = mask_cls.softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > 0.8)
    probs = mask_pred.sigmoid()[keep]
    owner = (scores[keep].view(-1, 1, 1) * probs).argmax(0)
    panoptic_seg = torch.zeros(mask_pred.shape[-2:], dtype=torch.int32)
    segments_info, stuff_ids = [], {}
    for k, category in enumerate(labels[keep].tolist()):
        mask = owner == k
        area, original = int(mask.sum()), int((probs[k] >= 0.5).sum())
        if m2f:
            mask = mask & (probs[k] >= 0.5)
        if area == 0 or original == 0 or not bool(mask.any()) or area / original < overlap:
            continue
        if category not in thing_ids and category in stuff_ids:
            panoptic_seg[mask] = stuff_ids[category]
            continue
        new_id = len(segments_info) + 1
        if category not in thing_ids:
            stuff_ids[category] = new_id
        panoptic_seg[mask] = new_id
        segments_info.append(
            {"id": new_id, "isthing": category in thing_ids, "category_id": category}
        )
    return panoptic_seg, segments_info


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("m2f", [False, True])
def test_panoptic_matches_a_per_query_loop_on_random_blobs(seed, m2f):
    generator = torch.Generator().manual_seed(seed)
    num_queries, num_classes, height, width = 12, 4, 21, 27
    mask_cls = torch.randn(num_queries, num_classes + 1, generator=generator)
    classes = torch.randint(0, num_classes + 1, (num_queries,), generator=generator)
    mask_cls[torch.arange(num_queries), classes] += 6.0
    # Gaussian blobs give each query a compact region, so segments survive the overlap test.
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centers = torch.rand(num_queries, 2, generator=generator) * torch.tensor([height, width])
    dist2 = (ys - centers[:, :1, None]) ** 2 + (xs - centers[:, 1:, None]) ** 2
    mask_pred = 6.0 - dist2 / 8.0 + torch.randn(num_queries, height, width, generator=generator)
    # Blobs overlap a lot at this size; 0.6 keeps some segments and drops others.
    expected = _reference_panoptic(mask_cls, mask_pred, num_classes, {1, 2}, m2f, 0.6)
    panoptic_seg, segments_info = _panoptic(mask_cls, mask_pred, num_classes, [1, 2], m2f, 0.6)
    assert torch.equal(panoptic_seg, expected[0])
    assert segments_info == expected[1]
    assert len(segments_info) > 0


# ------------------------------------------------------------------------------------------------
# instances


@pytest.mark.parametrize(
    "key, panoptic_on", [("instances", False), ("instances_panoptic_on", True)]
)
def test_instances_match_golden(golden, key, panoptic_on):
    thing_ids = golden["metadata_thing_dataset_id_to_contiguous_id"].values()
    result = instance_inference(
        golden["mask_cls"],
        golden["mask_pred"],
        num_classes=golden["num_classes"],
        topk=golden["test_topk_per_image"],
        thing_ids=thing_ids if panoptic_on else None,
    )
    expected = golden[key]["sorted"]
    assert isinstance(result, Instances)
    assert result.image_size == tuple(golden[key]["image_size"])
    assert len(result) == len(expected["scores"])
    assert torch.equal(result.pred_masks, expected["pred_masks"])
    torch.testing.assert_close(result.scores, expected["scores"], atol=1e-5, rtol=0)
    assert result.pred_classes.dtype == torch.int64
    assert torch.equal(result.pred_classes, expected["pred_classes"])
    boxes = _numpy_boxes(expected["pred_masks"])
    np.testing.assert_array_equal(result.pred_boxes.tensor.numpy(), boxes)
    assert (boxes[:, 2:] > boxes[:, :2]).any()


def test_instances_topk_larger_than_pairs_is_clamped():
    mask_cls = torch.randn(2, 4)
    mask_pred = torch.randn(2, 5, 6)
    result = instance_inference(mask_cls, mask_pred, num_classes=3, topk=100)
    assert len(result) == 6
    assert sorted(result.pred_classes.tolist()) == [0, 0, 1, 1, 2, 2]
    assert bool((result.scores[:-1] >= result.scores[1:]).all())


def test_instances_hand_computed_scores_and_order():
    # Class probs softmax([ln 6, ln 3, 0, 0]) = [6, 3, 1] / 11 (+ 1 / 11 no object).
    row = torch.tensor([float(np.log(6.0)), float(np.log(3.0)), 0.0, 0.0])
    mask_cls = torch.stack([row, row])
    mask_pred = torch.full((2, 3, 4), -20.0)
    mask_pred[0, 0, :2] = 20.0  # q0: 2 pixels with prob 1.0
    mask_pred[1, 1:, 3] = 0.0  # q1: logits 0 are not > 0, so q1's mask is empty
    mask_pred[1, 2, 3] = 20.0  # ... except this pixel
    result = instance_inference(mask_cls, mask_pred, num_classes=3, topk=3)
    mean_q0 = 2.0 / (2.0 + 1e-6)
    mean_q1 = 1.0 / (1.0 + 1e-6)
    # Top-3 of [6, 3, 1, 6, 3, 1] / 11 with ties going to the lower flat index: 0, 3, 1.
    torch.testing.assert_close(
        result.scores,
        torch.tensor([6 / 11 * mean_q0, 6 / 11 * mean_q1, 3 / 11 * mean_q0]),
        atol=1e-6,
        rtol=0,
    )
    assert result.pred_classes.tolist() == [0, 0, 1]
    assert result.pred_boxes.tensor.tolist() == [[0, 0, 2, 1], [3, 2, 4, 3], [0, 0, 2, 1]]


def test_instances_equal_scores_are_ordered_by_flat_index():
    # Identical class logits and same-size masks with prob exactly 1.0: scores tie in pairs.
    mask_cls = torch.tensor([[2.0, 1.0, -5.0], [2.0, 1.0, -5.0]])
    mask_pred = torch.full((2, 4, 4), -20.0)
    mask_pred[0, :2, :2] = 20.0
    mask_pred[1, 2:, 2:] = 20.0
    result = instance_inference(mask_cls, mask_pred, num_classes=2, topk=4)
    assert result.scores[0] == result.scores[1] and result.scores[2] == result.scores[3]
    assert result.pred_classes.tolist() == [0, 0, 1, 1]
    first_query = (mask_pred[0] > 0).float()
    second_query = (mask_pred[1] > 0).float()
    for mask, query in zip(result.pred_masks, [first_query, second_query] * 2):
        assert torch.equal(mask, query)


def test_instances_thing_filter_and_empty_results():
    mask_cls = torch.randn(4, 6)
    mask_pred = torch.randn(4, 7, 9)
    result = instance_inference(mask_cls, mask_pred, num_classes=5, topk=20, thing_ids=[1, 3])
    assert set(result.pred_classes.tolist()) <= {1, 3} and len(result) > 0
    unfiltered = instance_inference(mask_cls, mask_pred, num_classes=5, topk=20)
    is_thing = (unfiltered.pred_classes == 1) | (unfiltered.pred_classes == 3)
    torch.testing.assert_close(result.scores, unfiltered.scores[is_thing], atol=0, rtol=0)

    for empty in (
        instance_inference(mask_cls, mask_pred, num_classes=5, topk=20, thing_ids=[]),
        instance_inference(mask_cls, mask_pred, num_classes=5, topk=0),
    ):
        assert len(empty) == 0
        assert empty.pred_masks.shape == (0, 7, 9)
        assert empty.pred_boxes.tensor.shape == (0, 4)
        assert empty.image_size == (7, 9)


def test_instances_empty_mask_has_zero_box_and_score():
    mask_cls = torch.tensor([[5.0, 0.0]])
    mask_pred = torch.full((1, 3, 3), -1.0)
    result = instance_inference(mask_cls, mask_pred, num_classes=1, topk=1)
    assert result.pred_masks.sum() == 0
    assert result.scores.tolist() == [0.0]
    assert result.pred_boxes.tensor.tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_instances_ties_follow_flat_index_not_class_probability():
    # Both masks are empty, so both scores are 0. q1's class 0 (flat 2) has the larger class
    # probability, but the tie goes to q0's class 1 (flat 1).
    mask_cls = torch.tensor([[-5.0, 3.0, -5.0], [5.0, -5.0, -5.0]])
    mask_pred = torch.full((2, 3, 3), -1.0)
    result = instance_inference(mask_cls, mask_pred, num_classes=2, topk=2)
    assert result.scores.tolist() == [0.0, 0.0]
    assert result.pred_classes.tolist() == [1, 0]


def test_masks_to_boxes_literal_and_against_bitmasks():
    masks = torch.zeros(3, 5, 7, dtype=torch.bool)
    masks[0, 1:3, 3:6] = True
    masks[1, 4, 0] = True
    assert masks_to_boxes(masks).tolist() == [[3, 1, 6, 3], [0, 4, 1, 5], [0, 0, 0, 0]]
    random_masks = torch.rand(6, 11, 13) > 0.93
    random_masks[2] = False
    torch.testing.assert_close(
        masks_to_boxes(random_masks), BitMasks(random_masks).get_bounding_boxes().tensor
    )


# ------------------------------------------------------------------------------------------------
# resize chain


def test_resize_chain_shapes_and_values():
    # A horizontal ramp stays a ramp; a constant stays constant through both resizes.
    ramp = torch.arange(6.0).expand(4, 6)
    pred_masks = torch.stack([ramp, torch.full((4, 6), 3.0)])[None]
    padded = upsample_mask_logits(pred_masks, (8, 12))
    assert padded.shape == (1, 2, 8, 12)
    torch.testing.assert_close(padded[0, 1], torch.full((8, 12), 3.0))
    # Bilinear, align_corners=False: output x maps to input 0.5 * x - 0.25, clamped at 0 and 5.
    expected_row = (0.5 * torch.arange(12.0) - 0.25).clamp(0.0, 5.0)
    torch.testing.assert_close(padded[0, 0, 3], expected_row)
    output = sem_seg_postprocess(padded[0], (7, 10), 14, 20)
    assert output.shape == (2, 14, 20)
    torch.testing.assert_close(output[1], torch.full((14, 20), 3.0))
