"""Published checkpoints load unchanged: state_dict keys, shapes and dtypes equal the published
models', and .pkl files in both pixel-decoder layouts load through DetectionCheckpointer."""

import logging
import pickle

import pytest
import torch
from conftest import REPO, SHARED, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from mask_former import add_mask_former_config

TSV_DIR = SHARED / "spec" / "checkpoint_format"
# Checked here: the MaskFormer files; Swin and Mask2Former files are checked with their components.
MASKFORMER_TSVS = [
    "maskformer__ade20k-150__maskformer_R50_bs16_160k.tsv",
    "maskformer__ade20k-150__maskformer_R101_bs16_160k.tsv",
    "maskformer__coco-panoptic__maskformer_panoptic_R50_bs64_554k.tsv",
    "maskformer__ade20k-150__per_pixel_baseline_R50_bs16_160k.tsv",
    "maskformer__ade20k-150__per_pixel_baseline_plus_R50_bs16_160k.tsv",
]


def tsv_config(tsv_name):
    """Our config of a checkpoint-format file: its name is the published config path with '/'
    written as '__', after the project name."""
    _, *path = tsv_name[: -len(".tsv")].split("__")
    return "configs/" + "/".join(path) + ".yaml"


def read_tsv(path):
    rows = []
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        shape = tuple(int(s) for s in shape.split(",")) if shape else ()
        rows.append((key, shape, dtype))
    return rows


def full_size_model(config_file):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(str(REPO / config_file), allow_unsafe=False)
    cfg.MODEL.DEVICE = "cpu"
    return build_model(cfg)


@pytest.mark.parametrize("tsv", MASKFORMER_TSVS)
def test_state_dict_equals_published_layout(tsv):
    expected = read_tsv(TSV_DIR / tsv)
    model = full_size_model(tsv_config(tsv))
    ours = [
        (k, tuple(v.shape), str(v.dtype).replace("torch.", ""))
        for k, v in model.state_dict().items()
    ]
    assert [k for k, _, _ in ours] == [k for k, _, _ in expected]
    assert ours == expected


def _pkl(tmp_path, name, state_dict):
    path = tmp_path / name
    model = {k: v.detach().numpy() for k, v in state_dict.items()}
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "test"}, f)
    return str(path)


def _old_layout(state_dict):
    # Older published files keep pixel-decoder weights directly under sem_seg_head.
    return {
        k.replace("sem_seg_head.pixel_decoder.", "sem_seg_head."): v for k, v in state_dict.items()
    }


@pytest.mark.parametrize("layout", ["pixel_decoder", "old"])
@pytest.mark.parametrize(
    "config_file",
    [
        "configs/ade20k-150/maskformer_R50_bs16_160k.yaml",
        "configs/coco-panoptic/maskformer_panoptic_R50_bs64_554k.yaml",
        "configs/ade20k-150/per_pixel_baseline_R50_bs16_160k.yaml",
    ],
)
def test_pkl_checkpoint_loads_in_both_layouts(tmp_path, caplog, layout, config_file):
    torch.manual_seed(1)
    source = build_model(tiny_cfg(config_file, MODEL__SEM_SEG_HEAD__TRANSFORMER_ENC_LAYERS=1))
    state_dict = source.state_dict()
    if layout == "old":
        state_dict = _old_layout(state_dict)
        assert not any(".pixel_decoder." in k for k in state_dict)
    path = _pkl(tmp_path, f"{layout}.pkl", state_dict)

    torch.manual_seed(2)
    target = build_model(tiny_cfg(config_file, MODEL__SEM_SEG_HEAD__TRANSFORMER_ENC_LAYERS=1))
    assert not torch.equal(
        next(target.sem_seg_head.pixel_decoder.parameters()),
        next(source.sem_seg_head.pixel_decoder.parameters()),
    )
    with caplog.at_level(logging.INFO):
        DetectionCheckpointer(target).load(path)
    text = caplog.text
    assert "not found" not in text and "not used" not in text, text
    assert "pixel_decoder.pixel_decoder" not in text
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


def test_own_pth_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    source = build_model(tiny_cfg())
    DetectionCheckpointer(source, save_dir=str(tmp_path)).save("model_final")
    torch.manual_seed(2)
    target = build_model(tiny_cfg())
    DetectionCheckpointer(target).load(str(tmp_path / "model_final.pth"))
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k
