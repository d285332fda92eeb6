"""Shared test fixtures: the reference files in ../shared and a fixed seed for every test."""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASK_FORMER_SHARED", REPO.parent / "shared"))
GOLDEN = SHARED / "golden"


def load_golden(name):
    """Loads ``../shared/golden/<name>`` (tensors, dicts and lists only)."""
    path = GOLDEN / name
    if not path.exists():
        pytest.fail(f"golden file {path} is missing (set MASK_FORMER_SHARED to the shared/ folder)")
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
