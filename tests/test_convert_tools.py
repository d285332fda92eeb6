"""tools/convert_torchvision_to_d2.py and tools/convert_swin_to_d2.py on synthetic checkpoints with
the real key sets (torchvision's ResNet-50/101, the published Swin-T layout): names, format, and
loading through DetectionCheckpointer into the models of our configs."""

import argparse
import functools
import logging
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from conftest import REPO, load_script
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_backbone
from test_checkpoint_compat import TSV_DIR, full_size_model, read_tsv

from mask_former import add_mask_former_config

pytestmark = pytest.mark.usefixtures("one_thread")

SWIN_TSV = "maskformer__ade20k-150__swin__maskformer_swin_tiny_bs16_160k.tsv"
SWIN_CONFIG = "configs/ade20k-150/swin/maskformer_swin_tiny_bs16_160k.yaml"
RESNET_CONFIGS = {
    "resnet50": "configs/ade20k-150/maskformer_R50_bs16_160k.yaml",
    "resnet101": "configs/ade20k-150/maskformer_R101_bs16_160k.yaml",
}


def load_tool(name):
    return load_script(f"tools/{name}.py", name)


convert_torchvision = load_tool("convert_torchvision_to_d2")
convert_swin = load_tool("convert_swin_to_d2")


def randomized(state_dict, seed=0):
    """The state_dict with every float tensor redrawn, so that a weight left at its (BatchNorm or
    LayerNorm) initial value in the model cannot pass for a loaded one."""
    generator = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
        for k, v in state_dict.items()
    }


def read_pkl(path):
    with open(path, "rb") as f:
        return pickle.load(f)


def load_logged(model, path, caplog):
    """Loads ``path`` into ``model`` with DetectionCheckpointer; returns the messages of the
    'not found' and 'not used' warnings ('' if none)."""
    with caplog.at_level(logging.INFO):
        DetectionCheckpointer(model).load(str(path))
    messages = [r.getMessage() for r in caplog.records]
    missing = "\n".join(m for m in messages if "not found in the checkpoint" in m)
    unused = "\n".join(m for m in messages if "not used by the model" in m)
    return missing, unused


# --------------------------------------------------------------------------------- torchvision


@pytest.fixture(scope="module", params=sorted(RESNET_CONFIGS))
def torchvision_pkl(request, tmp_path_factory):
    """(arch, original state_dict, converted .pkl path) of a randomized torchvision ResNet."""
    torch.manual_seed(0)
    state_dict = randomized(getattr(torchvision.models, request.param)().state_dict())
    folder = tmp_path_factory.mktemp(request.param)
    torch.save(state_dict, folder / "in.pth")
    convert_torchvision.main([str(folder / "in.pth"), str(folder / "out.pkl")])
    return request.param, state_dict, folder / "out.pkl"


def test_torchvision_names_are_detectron2_resnet_names(torchvision_pkl):
    arch, state_dict, path = torchvision_pkl
    data = read_pkl(path)
    assert data["__author__"] == "torchvision" and data["matching_heuristics"] is True
    model = data["model"]
    assert all(isinstance(v, np.ndarray) for v in model.values())
    # Exactly the keys of detectron2's ResNet (FrozenBN: no num_batches_tracked), fc dropped.
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(str(REPO / RESNET_CONFIGS[arch]), allow_unsafe=False)
    with torch.device("meta"):  # names and shapes only
        backbone = build_backbone(cfg)
    assert sorted(model) == sorted(backbone.state_dict())
    assert not any(k.startswith("fc.") or "num_batches_tracked" in k for k in model)
    # Spot checks of the renaming rules.
    pairs = {
        "conv1.weight": "stem.conv1.weight",
        "bn1.running_var": "stem.conv1.norm.running_var",
        "layer1.0.downsample.0.weight": "res2.0.shortcut.weight",
        "layer1.0.downsample.1.bias": "res2.0.shortcut.norm.bias",
        "layer3.5.bn2.weight": "res4.5.conv2.norm.weight",
        "layer4.2.conv3.weight": "res5.2.conv3.weight",
    }
    for old, new in pairs.items():
        assert np.array_equal(model[new], state_dict[old].numpy()), old


def test_torchvision_pkl_loads_into_resnet_config(torchvision_pkl, caplog):
    arch, state_dict, path = torchvision_pkl
    model = full_size_model(RESNET_CONFIGS[arch])
    missing, unused = load_logged(model, path, caplog)
    assert "backbone" not in missing and "sem_seg_head" in missing, missing
    assert not unused, unused
    ours = model.backbone.state_dict()
    for old, value in state_dict.items():
        new = convert_torchvision.convert_key(old)
        if new is not None:
            assert torch.equal(ours[new], value), old


def test_torchvision_convert_key_rejects_unknown_names():
    assert convert_torchvision.convert_key("layer2.3.bn3.running_mean") == (
        "res3.3.conv3.norm.running_mean"
    )
    assert convert_torchvision.convert_key("fc.weight") is None
    with pytest.raises(ValueError, match="unexpected key"):
        convert_torchvision.convert_key("layer1.0.se.fc1.weight")


# ---------------------------------------------------------------------------------------- Swin


STAGE_NORMS = re.compile(r"^norm[0-3]\.")


@functools.lru_cache(maxsize=1)
def swin_imagenet_state_dict():
    """The published Swin-T ImageNet keys: our backbone's (from the checkpoint-format file) without
    ``backbone.``, plus the classifier and the final norm; random values."""
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for key, shape, dtype in read_tsv(TSV_DIR / SWIN_TSV):
        if key.startswith("backbone."):
            name = key[len("backbone.") :]
            if dtype == "int64":
                state_dict[name] = torch.randint(0, 169, shape, generator=generator)
            else:
                state_dict[name] = torch.randn(shape, generator=generator)
    state_dict["norm.weight"], state_dict["norm.bias"] = torch.randn(768), torch.randn(768)
    state_dict["head.weight"], state_dict["head.bias"] = torch.randn(1000, 768), torch.randn(1000)
    return state_dict


@pytest.mark.parametrize("stage_norms", [True, False], ids=["with_norm0-3", "classifier_only"])
def test_swin_checkpoint_converts_as_is_and_loads_into_swin_config(tmp_path, caplog, stage_norms):
    """With and without the per-stage norms: the segmentation backbone adds ``norm0..3``, which a
    classification checkpoint does not hold (they then keep their initial values)."""
    state_dict = {
        k: v
        for k, v in swin_imagenet_state_dict().items()
        if stage_norms or not STAGE_NORMS.match(k)
    }
    torch.save({"model": state_dict}, tmp_path / "swin_tiny.pth")
    convert_swin.main([str(tmp_path / "swin_tiny.pth"), str(tmp_path / "swin_tiny.pkl")])
    data = read_pkl(tmp_path / "swin_tiny.pkl")
    assert data["__author__"] == "third_party" and data["matching_heuristics"] is True
    assert list(data["model"]) == list(state_dict)
    for key, value in data["model"].items():
        assert isinstance(value, np.ndarray) and np.array_equal(value, state_dict[key].numpy())

    model = full_size_model(SWIN_CONFIG)
    missing, unused = load_logged(model, tmp_path / "swin_tiny.pkl", caplog)
    missing_stage_norms = re.compile(r"backbone\.norm[0-3]\.\{bias, weight\}")
    assert len(missing_stage_norms.findall(missing)) == (0 if stage_norms else 4), missing
    assert "backbone" not in missing_stage_norms.sub("", missing), missing
    assert "head.{bias, weight}" in unused and "norm.{bias, weight}" in unused, unused
    ours = model.backbone.state_dict()
    assert len(ours) == len(swin_imagenet_state_dict()) - 4
    for key, value in ours.items():
        if key in state_dict:
            assert torch.equal(value, state_dict[key]), key
        else:  # a stage norm the classification checkpoint lacks: still at its initial value
            assert STAGE_NORMS.match(key), key
            assert torch.equal(value, torch.full_like(value, key.endswith("weight")))


# -------------------------------------------------------------------------------------- errors


def _save(path, obj):
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("tool", ["torchvision", "swin"])
def test_refuses_files_that_are_not_tensor_checkpoints(tmp_path, tool):
    module = convert_torchvision if tool == "torchvision" else convert_swin
    loader = (
        convert_torchvision.load_state_dict
        if tool == "torchvision"
        else convert_swin.load_swin_state_dict
    )
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    pickled_object = _save(tmp_path / "object.pth", {"model": argparse.Namespace(a=1)})
    not_tensors = _save(tmp_path / "numbers.pth", {"model": {"patch_embed.proj.weight": 1}})
    for path in (str(garbage), pickled_object, not_tensors):
        with pytest.raises(ValueError, match=re.escape(path)):
            loader(path)
    with pytest.raises(ValueError, match="garbage"):
        module.main([str(garbage), str(tmp_path / "out.pkl")])
    assert not (tmp_path / "out.pkl").exists()


def test_refuses_checkpoints_without_the_expected_keys(tmp_path):
    # Only the keys the tools check for; small tensors keep the files small.
    resnet = {k: torch.zeros(1) for k in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight")}
    swin_keys = {k: torch.zeros(1) for k in convert_swin.REQUIRED_KEYS}
    wrapped = _save(tmp_path / "wrapped.pth", {"state_dict": resnet})
    with pytest.raises(ValueError, match=r"wrapped\.pth is not a plain state_dict"):
        convert_torchvision.load_state_dict(wrapped)
    with pytest.raises(ValueError, match=r"swin\.pth is not a torchvision ResNet.*lacks"):
        convert_torchvision.load_state_dict(_save(tmp_path / "swin.pth", swin_keys))
    with pytest.raises(ValueError, match=r"plain\.pth is not a Swin checkpoint"):
        convert_swin.load_swin_state_dict(_save(tmp_path / "plain.pth", swin_keys))
    prefixed = {"backbone." + k: v for k, v in swin_keys.items()}
    with pytest.raises(ValueError, match=r"prefixed\.pth.*lacks"):
        convert_swin.load_swin_state_dict(_save(tmp_path / "prefixed.pth", {"model": prefixed}))
    with pytest.raises(ValueError, match=r"resnet\.pth.*lacks"):
        convert_swin.load_swin_state_dict(_save(tmp_path / "resnet.pth", {"model": resnet}))
    # The same dicts, as expected, pass.
    assert convert_torchvision.load_state_dict(_save(tmp_path / "ok.pth", resnet)).keys() == (
        resnet.keys()
    )
    assert convert_swin.load_swin_state_dict(_save(tmp_path / "ok.pth", {"model": swin_keys}))


@pytest.mark.parametrize(
    "published_name, tool",
    [
        ("convert-pretrained-swin-model-to-d2.py", "convert_swin_to_d2"),
        ("convert-torchvision-to-d2.py", "convert_torchvision_to_d2"),
    ],
)
def test_published_script_names_run_the_converters(tmp_path, published_name, tool):
    """The published READMEs call the converters by these names, from the repository root."""
    if tool == "convert_swin_to_d2":
        torch.save({"model": swin_imagenet_state_dict()}, tmp_path / "in.pth")
    else:
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "in.pth")
    subprocess.run(
        [
            sys.executable,
            f"tools/{published_name}",
            str(tmp_path / "in.pth"),
            str(tmp_path / "a.pkl"),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    load_tool(tool).main([str(tmp_path / "in.pth"), str(tmp_path / "b.pkl")])
    published, ours = read_pkl(tmp_path / "a.pkl"), read_pkl(tmp_path / "b.pkl")
    assert list(published["model"]) == list(ours["model"])
    assert all(np.array_equal(published["model"][k], v) for k, v in ours["model"].items())
