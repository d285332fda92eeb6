"""The config adder and the config zoo under configs/.

Checks that :func:`add_mask_former_config` adds every key of the published adders with the
published defaults (``../shared/spec/config_keys.yaml``), that every YAML under ``configs/`` merges
safely, and that every config resolves to the published hyperparameters
(``../shared/spec/published_configs/``).
"""

import logging
from pathlib import Path

import pytest
import yaml
from conftest import SHARED
from detectron2.config import get_cfg
from detectron2.projects.deeplab import add_deeplab_config

from mask_former.config import OWN_CONFIG_KEYS, add_mask_former_config, add_maskformer2_config

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SPEC = SHARED / "spec"
PUBLISHED = SPEC / "published_configs"

# Top-level folders of the two published config zoos; they share one configs/ folder here.
MASKFORMER_DIRS = (
    "ade20k-150",
    "ade20k-150-panoptic",
    "ade20k-full-847",
    "cityscapes-19",
    "coco-panoptic",
    "coco-stuff-10k-171",
    "mapillary-vistas-65",
)
MASK2FORMER_DIRS = ("ade20k", "cityscapes", "coco", "mapillary-vistas")

# Families whose every published config must have a counterpart (relative to configs/).
REQUIRED_FAMILIES = (
    "ade20k-150",
    "coco-panoptic",
    "ade20k/semantic-segmentation",
    "coco/panoptic-segmentation",
    "coco/instance-segmentation",
)

# The only default of ours that differs from a published adder's (see mask_former/config.py).
DECODER_NAME_KEY = "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME"
OUR_DECODER_NAME_DEFAULT = "StandardTransformerDecoder"


def _flatten(node, prefix=""):
    """Maps the full dotted name of every leaf of a (CfgNode or plain) dict to its value."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _normalize(value):
    """Tuples and lists compare equal as lists; everything else compares as is."""
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def _same(a, b):
    """Equality that also tells bools, ints and floats apart (1 != 1.0 != True here)."""
    a, b = _normalize(a), _normalize(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _base_cfg():
    cfg = get_cfg()
    add_mask_former_config(cfg)
    return cfg


def _load(path):
    cfg = _base_cfg()
    cfg.merge_from_file(str(path), allow_unsafe=False)
    return cfg


def _spec_path(rel):
    """Published resolved config for ``configs/<rel>``, or None if ``rel`` is in no zoo."""
    top = rel.parts[0]
    if top in MASKFORMER_DIRS:
        return PUBLISHED / "maskformer" / rel
    if top in MASK2FORMER_DIRS:
        return PUBLISHED / "mask2former" / rel
    return None


def _spec_files():
    """``configs/``-relative paths of every published config."""
    rels = []
    for zoo in ("maskformer", "mask2former"):
        rels += [p.relative_to(PUBLISHED / zoo) for p in (PUBLISHED / zoo).rglob("*.yaml")]
    return sorted(rels)


def _is_required(rel):
    return any(rel.as_posix().startswith(family + "/") for family in REQUIRED_FAMILIES)


def _spec_section(name):
    return yaml.safe_load((SPEC / "config_keys.yaml").read_text())[name]


OUR_YAMLS = sorted(p.relative_to(CONFIGS) for p in CONFIGS.rglob("*.yaml"))
SPEC_FILES = _spec_files()


# ------------------------------------------------------------------------------------ the adder


@pytest.mark.parametrize(
    "section", ["add_deeplab_config", "add_mask_former_config", "add_maskformer2_config"]
)
def test_adder_has_published_keys_and_defaults(section):
    ours = _flatten(_base_cfg())
    expected = dict(_spec_section(section))
    if DECODER_NAME_KEY in expected:
        expected[DECODER_NAME_KEY] = OUR_DECODER_NAME_DEFAULT
    missing = sorted(set(expected) - set(ours))
    assert not missing, f"keys of {section} that add_mask_former_config lacks: {missing}"
    wrong = {k: (ours[k], v) for k, v in expected.items() if not _same(ours[k], v)}
    assert not wrong, f"defaults differing from {section} (ours, published): {wrong}"


def test_decoder_name_default_builds_maskformer_decoder():
    assert _base_cfg().MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME == "StandardTransformerDecoder"


def test_own_keys_are_exactly_the_extra_keys():
    published = set()
    for section in ("add_deeplab_config", "add_mask_former_config", "add_maskformer2_config"):
        published |= set(_spec_section(section))
    extra = set(_flatten(_base_cfg())) - set(_flatten(get_cfg())) - published
    assert extra == set(OWN_CONFIG_KEYS)


def test_own_keys_are_documented_in_readme():
    readme = REPO / "README.md"
    assert readme.exists(), "README.md is missing"
    text = readme.read_text()
    undocumented = [key for key in OWN_CONFIG_KEYS if key not in text]
    assert not undocumented, f"keys of ours not documented in README.md: {undocumented}"


def test_maskformer2_alias():
    assert add_maskformer2_config is add_mask_former_config


def test_adder_after_deeplab_adder():
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_mask_former_config(cfg)
    assert _flatten(cfg) == _flatten(_base_cfg())


def test_adder_leaves_deeplab_values_alone():
    """A deeplab key set before the adder runs keeps its value (the adder adds, never resets)."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    cfg.SOLVER.POLY_LR_POWER = 2.0
    add_mask_former_config(cfg)
    assert cfg.SOLVER.POLY_LR_POWER == 2.0


# ----------------------------------------------------------------------------- the config zoo


def test_configs_exist():
    assert OUR_YAMLS, f"no YAML under {CONFIGS}"


@pytest.mark.parametrize("rel", OUR_YAMLS, ids=str)
def test_config_merges_safely(rel):
    text = (CONFIGS / rel).read_text()
    assert "!!python" not in text
    assert isinstance(yaml.safe_load(text), dict), "not a plain YAML mapping"
    _load(CONFIGS / rel)  # raises on unknown keys, type mismatches and unsafe tags


@pytest.mark.parametrize("rel", [r for r in OUR_YAMLS if _spec_path(r) is not None], ids=str)
def test_zoo_config_mirrors_a_published_one(rel):
    """Inside the published zoos' folders every file keeps a published path (and its values)."""
    assert _spec_path(rel).exists(), f"configs/{rel} has no published counterpart"


@pytest.mark.parametrize("rel", SPEC_FILES, ids=str)
def test_config_resolves_to_published_values(rel):
    ours = CONFIGS / rel
    if not ours.exists():
        if _is_required(rel):
            pytest.fail(f"configs/{rel} is missing")
        pytest.skip(f"configs/{rel}: no counterpart yet")
    published = _flatten(yaml.safe_load(_spec_path(rel).read_text()))
    # Keys the published file leaves out hold the default; our own keys hold ours.
    expected = _flatten(_base_cfg())
    unknown = sorted(set(published) - set(expected))
    assert not unknown, f"published keys that our config lacks: {unknown}"
    expected.update(published)
    actual = _flatten(_load(ours))
    diffs = [
        f"{key}: ours {actual[key]!r}, published {expected[key]!r}"
        for key in sorted(expected)
        if not _same(actual[key], expected[key])
    ]
    assert not diffs, f"configs/{rel} differs from the published config:\n" + "\n".join(diffs[:10])


def test_list_configs_without_counterpart():
    """Logs the published configs we do not ship yet; fails only for the required families."""
    missing = [rel for rel in SPEC_FILES if not (CONFIGS / rel).exists()]
    for rel in missing:
        logger.info("published config without counterpart: %s", rel)
    required = [str(rel) for rel in missing if _is_required(rel)]
    assert not required, f"required configs missing: {required}"
    if missing:
        pytest.skip(f"{len(missing)} published configs have no counterpart yet")


def test_published_top_level_names_are_exported():
    """Scripts written against the published packages import these from the top level."""
    import mask_former
    from mask_former.data import DATASET_MAPPERS

    published_mask_former = {
        "add_mask_former_config",
        "DETRPanopticDatasetMapper",
        "MaskFormerPanopticDatasetMapper",
        "MaskFormerSemanticDatasetMapper",
        "MaskFormer",
        "SemanticSegmentorWithTTA",
    }
    published_mask2former = {
        "add_maskformer2_config",
        "COCOInstanceNewBaselineDatasetMapper",
        "COCOPanopticNewBaselineDatasetMapper",
        "MaskFormerInstanceDatasetMapper",
        "MaskFormerPanopticDatasetMapper",
        "MaskFormerSemanticDatasetMapper",
        "MaskFormer",
        "SemanticSegmentorWithTTA",
        "InstanceSegEvaluator",
    }
    expected = published_mask_former | published_mask2former
    assert set(mask_former.__all__) == expected
    assert all(hasattr(mask_former, name) for name in expected)
    assert set(DATASET_MAPPERS.values()) <= {getattr(mask_former, n) for n in expected}
