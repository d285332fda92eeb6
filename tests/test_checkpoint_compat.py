"""Published checkpoints load unchanged: state_dict keys, shapes and dtypes equal the published
models' (every file of ``../shared/spec/checkpoint_format``, Swin included), a .pkl in the published
model-zoo format with each file's keys loads into the model of the matching config, and .pkl files
in both pixel-decoder layouts load through DetectionCheckpointer."""

import logging
import pickle
import re

import pytest
import torch
from conftest import REPO, SHARED, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from mask_former import add_mask_former_config

TSV_DIR = SHARED / "spec" / "checkpoint_format"
# Every published checkpoint layout on record (MaskFormer and Mask2Former, ResNet and Swin).
ALL_TSVS = sorted(p.name for p in TSV_DIR.glob("*.tsv"))


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


def test_every_layout_is_checked():
    assert len(ALL_TSVS) >= 10 and any("swin" in name for name in ALL_TSVS)
    for tsv in ALL_TSVS:
        assert (REPO / tsv_config(tsv)).exists(), tsv


@pytest.mark.parametrize("tsv", ALL_TSVS)
def test_state_dict_equals_published_layout(tsv):
    expected = read_tsv(TSV_DIR / tsv)
    model = full_size_model(tsv_config(tsv))
    ours = [
        (k, tuple(v.shape), str(v.dtype).replace("torch.", ""))
        for k, v in model.state_dict().items()
    ]
    assert [k for k, _, _ in ours] == [k for k, _, _ in expected]
    assert ours == expected


def _distinct_state_dict(rows):
    """Tensors with the keys, shapes and dtypes of a checkpoint-format file, each filled with its
    own value (its index), so that a value loaded into the wrong key shows; cheaper than random."""
    return {
        key: torch.full(shape, index, dtype=getattr(torch, dtype))
        for index, (key, shape, dtype) in enumerate(rows)
    }


@pytest.mark.parametrize("tsv", ALL_TSVS)
def test_published_model_zoo_pkl_loads_into_its_config(tmp_path, caplog, tsv):
    """A file in the published format ({"model": numpy arrays, "__author__": ...}, exact names, no
    matching heuristics) with the published keys: nothing missing, nothing unused, all values
    loaded (what MODEL_ZOO.md promises)."""
    checkpoint = _distinct_state_dict(read_tsv(TSV_DIR / tsv))
    path = _pkl(tmp_path, "model_final.pkl", checkpoint)
    model = full_size_model(tsv_config(tsv))
    with caplog.at_level(logging.INFO):
        DetectionCheckpointer(model).load(path)
    assert "not found" not in caplog.text and "not used" not in caplog.text, caplog.text
    ours = model.state_dict()
    for key, value in checkpoint.items():
        assert torch.equal(ours[key], value), key


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


def _published_head_key_move(state_dict, prefix="sem_seg_head."):
    """What the published heads' load hook does with a checkpoint: when the head's recorded
    version is missing or below 2, every key under the head but ``predictor.*`` is moved under
    ``pixel_decoder.``."""
    version = state_dict._metadata.get(prefix[:-1], {}).get("version")
    if version is not None and version >= 2:
        return dict(state_dict)
    return {
        (
            k.replace(prefix, prefix + "pixel_decoder.", 1)
            if k.startswith(prefix) and not k.startswith(prefix + "predictor.")
            else k
        ): v
        for k, v in state_dict.items()
    }


@pytest.mark.parametrize(
    "config",
    [
        "configs/ade20k-150/maskformer_R50_bs16_160k.yaml",
        "configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml",
        "configs/ade20k-150/per_pixel_baseline_R50_bs16_160k.yaml",
    ],
)
def test_own_checkpoints_load_unchanged_in_the_published_code(tmp_path, config):
    """Our heads record module version 2, as the published ones do, so the published load hook
    leaves the keys of our checkpoints as they are."""
    model = build_model(tiny_cfg(config))
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    assert saved._metadata["sem_seg_head"]["version"] == 2
    assert list(_published_head_key_move(saved)) == list(model.state_dict())


def test_model_zoo_md_lists_every_config_and_the_recorded_ones():
    text = (REPO / "MODEL_ZOO.md").read_text()
    rows = re.findall(r"^\| `(configs/[^`]+\.yaml)` \|.*\| (\w+) \|$", text, flags=re.M)
    leaf_configs = {
        p.relative_to(REPO).as_posix()
        for p in (REPO / "configs").rglob("*.yaml")
        if not p.name.startswith("Base-") and p.parent.name != "shapes"
    }
    assert sorted(config for config, _ in rows) == sorted(leaf_configs)
    recorded = {config for config, check in rows if check == "recorded"}
    assert recorded == {tsv_config(tsv) for tsv in ALL_TSVS}
