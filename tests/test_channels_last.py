"""MODEL.MASK_FORMER.CHANNELS_LAST: the same model in the channels-last layout gives the same
outputs, losses and gradients (up to float rounding), and checkpoints move between layouts."""

import pytest
import torch
from conftest import set_flat, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from test_maskformer_model import METADATA_NAME, random_batch

CONFIGS = {
    "maskformer_fpn": ("configs/ade20k-150/maskformer_R50_bs16_160k.yaml", {}),
    "maskformer_transformer_encoder": (
        "configs/coco-panoptic/maskformer_panoptic_R50_bs64_554k.yaml",
        {"MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 1},
    ),
    "mask2former": (
        "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml",
        {
            "MODEL.MASK_FORMER.DEC_LAYERS": 3,
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 1,
            "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 256,
        },
    ),
}


def build_pair(name):
    """The model in the default layout and a channels-last copy with the same weights."""
    config_file, overrides = CONFIGS[name]
    models = []
    for channels_last in (False, True):
        cfg = tiny_cfg(config_file, DATASETS__TRAIN=(METADATA_NAME,))
        set_flat(cfg, overrides)
        set_flat(
            cfg,
            {
                "MODEL.MASK_FORMER.CHANNELS_LAST": channels_last,
                "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": True,
                "MODEL.MASK_FORMER.TEST.INSTANCE_ON": True,
                "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 5,
            },
        )
        models.append(build_model(cfg))
    reference, channels_last = models
    channels_last.load_state_dict(reference.state_dict())
    return reference, channels_last


def conv_weights(model):
    return [p for n, p in model.named_parameters() if p.dim() == 4]


def test_conversion_keeps_layout_after_loading_a_checkpoint(tmp_path):
    reference, model = build_pair("maskformer_fpn")
    assert conv_weights(model)
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights(model))
    assert all(p.is_contiguous() for p in conv_weights(reference))
    # a checkpoint written in one layout loads into the other with the same values
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("cl")
    fresh, _ = build_pair("maskformer_fpn")
    DetectionCheckpointer(fresh).load(str(tmp_path / "cl.pth"))
    for (name, a), b in zip(reference.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_outputs_in_both_layouts(name):
    reference, model = build_pair(name)
    reference.eval(), model.eval()
    batch = random_batch([(61, 83), (64, 64)], seed=4)
    with torch.no_grad():
        expected, actual = reference(batch), model(batch)
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a["sem_seg"], b["sem_seg"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            a["instances"].scores, b["instances"].scores, atol=1e-4, rtol=1e-4
        )
        # random weights: compare the panoptic maps pixel by pixel, allowing near-ties to differ
        same = (a["panoptic_seg"][0] == b["panoptic_seg"][0]).float().mean()
        assert same > 0.99


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_losses_and_gradients_in_both_layouts(name):
    reference, model = build_pair(name)
    results = []
    for m in (reference, model):
        m.train()
        torch.manual_seed(0)  # the same sampled points for the Mask2Former criterion
        losses = m(random_batch([(64, 80), (50, 70)], seed=5))
        sum(losses.values()).backward()
        results.append((losses, dict(m.named_parameters())))
    (losses_a, params_a), (losses_b, params_b) = results
    for key in losses_a:
        torch.testing.assert_close(losses_b[key], losses_a[key], atol=1e-4, rtol=1e-4)
    for key, p in params_a.items():
        if p.grad is not None:
            # BN/GN statistics are summed in another order: compare each gradient as a whole
            error = (params_b[key].grad - p.grad).norm()
            assert error <= 1e-3 * p.grad.norm() + 1e-5, key
