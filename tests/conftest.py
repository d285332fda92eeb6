"""Shared test fixtures: the reference files in ../shared and a fixed seed for every test."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASK_FORMER_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"


def load_script(relative_path, module_name, register=False):
    """
    Imports a script of the repository that is not in a package (``train_net.py``, ``tools/``,
    ``datasets/``, ``demo/``) as module ``module_name``. With ``register`` it is also put in
    ``sys.modules``, so that its functions pickle (for worker processes).
    """
    spec = importlib.util.spec_from_file_location(module_name, REPO / relative_path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def load_golden(name):
    """Loads ``../shared/golden/<name>`` (tensors, dicts and lists only)."""
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"golden file {path} is missing (set MASK_FORMER_SHARED to the shared/ folder)")
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """The golden files were recorded with one thread; with more, convolutions round differently
    (up to ~2e-4 on the tiny models' sem_seg)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def set_flat(cfg, flat):
    """Applies ``{dotted key: value}`` to a config (in place) and returns it."""
    for key, value in flat.items():
        *path, leaf = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        node[leaf] = value
    return cfg


# A ResNet-50 trunk of tiny width and a 32-wide head: builds and runs in well under a second.
TINY_OVERRIDES = {
    "MODEL.DEVICE": "cpu",
    "MODEL.WEIGHTS": "",
    "MODEL.RESNETS.WIDTH_PER_GROUP": 8,
    "MODEL.RESNETS.RES2_OUT_CHANNELS": 32,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 16,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 5,
    "MODEL.SEM_SEG_HEAD.CONVS_DIM": 32,
    "MODEL.SEM_SEG_HEAD.MASK_DIM": 32,
    "MODEL.MASK_FORMER.HIDDEN_DIM": 32,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 7,
    "MODEL.MASK_FORMER.NHEADS": 4,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 64,
    "MODEL.MASK_FORMER.DROPOUT": 0.0,
    "MODEL.MASK_FORMER.DEC_LAYERS": 2,
}


def tiny_cfg(config_file="configs/ade20k-150/maskformer_R50_bs16_160k.yaml", **overrides):
    """A published config shrunk with TINY_OVERRIDES (plus ``overrides``, dotted keys with '__'
    for '.')."""
    from detectron2.config import get_cfg

    from mask_former import add_mask_former_config

    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(str(REPO / config_file), allow_unsafe=False)
    set_flat(cfg, TINY_OVERRIDES)
    set_flat(cfg, {k.replace("__", "."): v for k, v in overrides.items()})
    return cfg
