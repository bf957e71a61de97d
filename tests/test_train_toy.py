"""The end-to-end PredCls example (python/train_sgg_toy.py, python/sgg_toy/model.py): a short training
run of the script, and one DDP step on two CPU processes (gloo, loopback only) against one process on
the whole batch."""
import json
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import ROOT, run_python  # noqa: E402

sys.path.insert(0, str(ROOT / "python"))

from sgg_toy import collate, make_scene  # noqa: E402
from sgg_toy.model import ToySGG, pair_labels  # noqa: E402

BATCH_SEEDS = (0, 1, 2, 3)  # the combined batch; rank r of 2 takes scenes 2r, 2r + 1 (contiguous halves)
MODEL_KW = dict(dim=32, roi_dim=64, union_dim=64, hidden=32)


def _run(args, timeout=600):
    """The package under test in a subprocess (helpers.run_python); ``python/...`` scripts of the checkout."""
    return run_python([ROOT / a if str(a).startswith("python/") else a for a in args], timeout=timeout)


def test_train_script_two_steps(tmp_path):
    out = tmp_path / "run"
    proc = _run(["python/train_sgg_toy.py", "--steps", "2", "--batch-size", "2", "--train-scenes", "4",
                 "--val-scenes", "4", "--dim", "32", "--no-progress", "--out-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "loss.png").stat().st_size > 1000
    data = json.loads((out / "metrics.json").read_text())
    assert data["steps"] == 2 and data["world_size"] == 1
    for method in ("model", "freq"):
        for k in (5, 10, 20, 50, 100):
            assert f"R@{k}" in data[method] and f"mR@{k}" in data[method]
    assert set(data["final_losses"]) == {"rel", "obj", "gce", "rde"}
    assert all(torch.isfinite(torch.tensor(v)) for v in data["final_losses"].values())
    assert "| ToySGG |" in proc.stdout and "| FREQ |" in proc.stdout


def _model():
    """The same initial weights in every process; train mode with BatchNorm in eval mode (the only
    BatchNorm is LinkNet's layout encoding: training-mode statistics would be per process)."""
    torch.manual_seed(0)
    model = ToySGG(**MODEL_KW)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _loss(model, seeds):
    b = collate([make_scene(s) for s in seeds])
    out = model(b["images"], b["boxes"], b["box_batch"], b["labels"], b["masks"], gt_rels=b["gt_rels"])
    return out["loss"]


def _ddp_worker(rank, world, port, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    try:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = _model()
        net = DDP(model)
        shard = len(BATCH_SEEDS) // world
        loss = _loss(net, BATCH_SEEDS[rank * shard:(rank + 1) * shard])
        loss.backward()
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            torch.save({"loss": torch.stack(losses).mean(),
                        "grads": {n: p.grad for n, p in model.named_parameters()}}, out_file)
        # both ranks leave together: a rank that tears gloo down while the other still works can
        # abort ("terminate called without an active exception")
        dist.barrier()
        del net
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo needed")
def test_ddp_step_matches_one_process_on_the_whole_batch(tmp_path):
    """The loss is a mean over images of per-image means, so DDP's average of the two halves' gradients
    must equal the gradient of one process on all four images (no rescaling needed)."""
    out_file = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out_file)), nprocs=2, join=True)
    ddp = torch.load(out_file)

    model = _model()
    loss = _loss(model, BATCH_SEEDS)
    loss.backward()
    torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    grads = dict(model.named_parameters())
    assert set(ddp["grads"]) == set(grads)
    for name, p in grads.items():
        assert p.grad is not None, f"{name} has no gradient"
        torch.testing.assert_close(ddp["grads"][name], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_pair_labels_and_per_image_loss():
    """pair_labels puts each annotated predicate on its pair; background elsewhere."""
    b = collate([make_scene(s) for s in BATCH_SEEDS])
    import sgg_kernels as sk

    pairs = sk.all_pairs(b["box_batch"])
    labels = pair_labels(pairs, b["gt_rels"], b["boxes"].shape[0])
    assert int((labels > 0).sum()) == b["gt_rels"].shape[0]
    lookup = {(int(s), int(o)): int(p) for s, o, p in b["gt_rels"]}
    for (s, o), lab in zip(pairs.tolist(), labels.tolist()):
        assert lab == lookup.get((s, o), 0)


def test_train_script_steps_emit_no_warning(tmp_path):
    """Three steps with the progress bar on (its postfix reads the loss every step) print no warning,
    e.g. torch's "Converting a tensor with requires_grad=True to a scalar" from float(loss)."""
    proc = _run(["python/train_sgg_toy.py", "--steps", "3", "--batch-size", "2", "--train-scenes", "4",
                 "--val-scenes", "4", "--dim", "32", "--out-dir", str(tmp_path / "run")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loss=" in proc.stderr  # the progress bar ran and showed the loss
    warnings = [line for line in proc.stderr.splitlines() if "Warning" in line]
    assert not warnings, "\n".join(warnings)
