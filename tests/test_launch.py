"""Multi-process CPU training: ``mask_former.engine.launch`` starts 2 gloo workers that train a tiny
model on shapes for 2 iterations with DistributedDataParallel, then evaluate."""

import datetime
import json
import uuid

import pytest
import torch
import torch.distributed as dist
from detectron2.utils import comm
from test_train_net import (
    SEMANTIC_CONFIG,
    command_line,
    load_train_net,
    prepare_shapes,
    shapes_overrides,
)
from torch.nn.parallel import DistributedDataParallel

from mask_former.data.datasets import shapes
from mask_former.engine import launch

NUM_WORKERS = 2
NUM_ITERATIONS = 2


def _train_worker(argv_overrides, shapes_root, prefix, result_dir):
    """Runs in each worker: trains through train_net's setup() and Trainer, then saves what the
    parent checks (this rank's own losses, its weights, the logged losses)."""
    shapes.register_all_shapes(shapes_root, prefix=prefix)
    train_net = load_train_net()
    cfg = train_net.setup(command_line(SEMANTIC_CONFIG, argv_overrides))
    trainer = train_net.Trainer(cfg)
    own_losses = []

    def record(module, inputs, losses):
        if module.training:
            own_losses.append(float(sum(losses.values())))

    trainer.model.module.register_forward_hook(record)
    trainer.resume_or_load(resume=False)
    trainer.train()
    rank = comm.get_rank()
    logged = trainer.storage.history("total_loss").values() if comm.is_main_process() else None
    result = {
        "world_size": comm.get_world_size(),
        "local_size": comm.get_local_size(),
        "backend": dist.get_backend(),
        "ddp_device_ids": getattr(trainer.model, "device_ids", "not DDP"),
        "is_ddp": isinstance(trainer.model, DistributedDataParallel),
        "own_losses": own_losses,
        "logged_losses": logged,
        "state": {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()},
    }
    torch.save(result, f"{result_dir}/rank{rank}.pth")


@pytest.fixture
def shapes_dataset(tmp_path, monkeypatch):
    prefix = f"shapes_launch_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(shapes.NUM_IMAGES_ENV["train"], "8")  # inherited by the workers
    monkeypatch.setenv(shapes.NUM_IMAGES_ENV["val"], "4")
    prepare_shapes(tmp_path / "datasets", prefix)
    return tmp_path / "datasets", prefix


def test_two_cpu_workers_train_with_synchronised_gradients(shapes_dataset, tmp_path):
    shapes_root, prefix = shapes_dataset
    output_dir = tmp_path / "output"
    extra = {"SOLVER.MAX_ITER": NUM_ITERATIONS}
    overrides = shapes_overrides(prefix, "sem_seg", output_dir, extra)
    launch(
        _train_worker,
        NUM_WORKERS,
        dist_url="auto",
        args=(overrides, shapes_root, prefix, tmp_path),
        timeout=datetime.timedelta(minutes=2),
        device="cpu",
    )
    results = [torch.load(tmp_path / f"rank{r}.pth") for r in range(NUM_WORKERS)]
    for result in results:
        assert result["world_size"] == NUM_WORKERS and result["local_size"] == NUM_WORKERS
        assert result["backend"] == "gloo"
        assert result["is_ddp"] and result["ddp_device_ids"] is None
        assert len(result["own_losses"]) == NUM_ITERATIONS
    # The workers saw different images (different losses) ...
    assert results[0]["own_losses"] != results[1]["own_losses"]
    # ... yet end with identical weights: their gradients were averaged.
    for key, value in results[0]["state"].items():
        assert torch.equal(value, results[1]["state"][key]), key
    # The logged total_loss of each iteration is the mean of the workers' losses.
    logged = results[0]["logged_losses"]
    assert [iteration for _, iteration in logged] == list(range(NUM_ITERATIONS))
    for i, (value, _) in enumerate(logged):
        mean = sum(r["own_losses"][i] for r in results) / NUM_WORKERS
        assert value == pytest.approx(mean, rel=1e-5)
    with open(output_dir / "metrics.json") as f:
        metrics = [json.loads(line) for line in f]
    # The distributed evaluation at the end gathered both workers' predictions.
    assert any("sem_seg/mIoU" in m for m in metrics)
    assert (output_dir / "model_final.pth").exists()


def _record_call(*args):
    _record_call.calls.append(args)


_record_call.calls = []


def test_one_process_runs_in_place():
    _record_call.calls.clear()
    launch(_record_call, 1, args=("a", 1), device="cpu")
    assert _record_call.calls == [("a", 1)]


def test_auto_url_needs_one_machine():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path")
    with pytest.raises(ValueError, match="single machine"):
        launch(_record_call, 2, num_machines=2, dist_url="auto", device="cpu")
