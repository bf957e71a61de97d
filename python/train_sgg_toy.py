"""Train ToySGG (python/sgg_toy/model.py) on the toy PredCls scenes and compare it with the FREQ baseline.

    .venv/bin/python python/train_sgg_toy.py --epochs 3 --out-dir runs/toy          # one process
    torchrun --nproc_per_node=2 python/train_sgg_toy.py --epochs 3 --out-dir runs/toy  # DDP (gloo on CPU, NCCL on CUDA)

The model uses all four families of sgg_kernels (SIL, Gaussian pair masks, LinkNet, RDE); see its
docstring for the data flow. Training scenes are seeds [seed, seed + train_scenes), held-out scenes
[val_seed, val_seed + val_scenes) (disjoint by default). Under DDP every rank takes its contiguous
shard of each batch (batch_size must be divisible by the world size); the losses are means over
images of per-image means, so DDP's gradient average equals the gradient of the whole batch. The
evaluation, the table, ``loss.png`` and ``metrics.json`` come from rank 0.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _example_args import parse_device  # noqa: E402
from sgg_toy import OBJECT_CLASSES, PREDICATES, collate, evaluate, frequency_baseline, make_scene, split_by_image  # noqa: E402
from sgg_toy.model import ToySGG  # noqa: E402

KS = (5, 10, 20, 50, 100)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=float, default=8.0, help="passes over the training scenes (ignored with --steps)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=16, help="images per step, over all processes")
    p.add_argument("--train-scenes", type=int, default=2000)
    p.add_argument("--val-scenes", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="model init, batch order, and the first training scene")
    p.add_argument("--val-seed", type=int, default=10 ** 6, help="first held-out scene")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--dim", type=int, default=64, help="channels of the backbone feature map")
    p.add_argument("--bg-weight", type=float, default=0.5, help="weight of background pairs in the relation loss")
    p.add_argument("--rde-weight", type=float, default=0.5, help="weight of the RDE losses (0: off)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    p.add_argument("--out-dir", default="runs/sgg_toy", help="where loss.png and metrics.json go")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_inputs(batch: dict):
    return batch["images"], batch["boxes"], batch["box_batch"], batch["labels"], batch["masks"]


@torch.no_grad()
def predict(model, scenes, device, batch_size=32):
    """Per scene, (local pairs [P, 2], rel_scores [P, C]) on the CPU, softmax scores."""
    model.eval()
    preds = []
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i:i + batch_size]
        batch = to_device(collate(chunk), device)
        out = model(*model_inputs(batch))
        scores = torch.softmax(out["rel_logits"].float(), dim=1)
        per_image = split_by_image(out["pairs"].cpu(), batch["box_batch"].cpu(), scores.cpu(), num_images=len(chunk))
        preds.extend(per_image)
    model.train()
    return preds


def freq_predictions(freq, scenes):
    out = []
    for s in scenes:
        N = s["labels"].shape[0]
        pairs = torch.tensor([(a, b) for a in range(N) for b in range(N) if a != b], dtype=torch.int64).reshape(-1, 2)
        out.append((pairs, freq.rel_scores(s["labels"], pairs)))
    return out


def save_loss_plot(history, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(history) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in history[0]:
        y = np.array([h[key] for h in history])
        ax.plot(steps, y, lw=0.6, alpha=0.35)
        w = max(1, min(25, len(y) // 10))
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1:], smooth, lw=1.6, label=key, color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per-image mean)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("ToySGG on the toy PredCls scenes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(model_metrics, freq_metrics) -> str:
    head = "| method | " + " | ".join(f"R@{k}" for k in KS) + " | " + " | ".join(f"mR@{k}" for k in KS) + " |"
    rule = "|---" * (1 + 2 * len(KS)) + "|"
    rows = [head, rule]
    for name, m in (("ToySGG", model_metrics), ("FREQ", freq_metrics)):
        rows.append(f"| {name} | " + " | ".join(f"{m[f'R@{k}']:.3f}" for k in KS) + " | "
                    + " | ".join(f"{m[f'mR@{k}']:.3f}" for k in KS) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = parse_device(parser, args.device)  # no CUDA visible: one argparse error line, exit code 2
    if device.type == "cuda":
        device = parse_device(parser, f"cuda:{local_rank}" if distributed else f"cuda:{device.index or 0}")
        torch.cuda.set_device(device)
    if distributed:
        import torch.distributed as dist
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if args.batch_size % world:
            raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the world size {world}")
    if args.val_seed < args.seed + args.train_scenes and args.seed < args.val_seed + args.val_scenes:
        raise SystemExit("training and held-out seed ranges overlap; move --val-seed")
    main_proc = rank == 0
    seed_everything(args.seed)  # same seed on every rank: identical initial weights (DDP also broadcasts them)

    t0 = time.time()
    train = [make_scene(args.seed + i) for i in range(args.train_scenes)]
    val = [make_scene(args.val_seed + i) for i in range(args.val_scenes)] if main_proc else []
    t_data = time.time() - t0

    model = ToySGG(dim=args.dim, bg_weight=args.bg_weight, rde_weight=args.rde_weight).to(device)
    net = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    steps = args.steps if args.steps is not None else max(1, round(args.epochs * steps_per_epoch))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = min(50, max(1, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    order_gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train), generator=order_gen).tolist()
    pos = 0
    history = []
    bar = None
    if main_proc and not args.no_progress:
        from tqdm import tqdm
        bar = tqdm(total=steps, desc="train", dynamic_ncols=True)
    t0 = time.time()
    model.train()
    for step in range(steps):
        if pos + args.batch_size > len(order):  # new epoch; the last incomplete batch is dropped
            order, pos = torch.randperm(len(train), generator=order_gen).tolist(), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        shard = len(idx) // world
        idx = idx[rank * shard:(rank + 1) * shard]  # this rank's contiguous shard of the batch
        batch = to_device(collate([train[i] for i in idx]), device)
        out = net(*model_inputs(batch), gt_rels=batch["gt_rels"])
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        sched.step()
        history.append({k: float(v.detach()) for k, v in out["losses"].items()})  # rank 0's shard
        if bar is not None:
            bar.update(1)  # the loss still requires grad: float() of it would warn every step
            bar.set_postfix(loss=f"{float(out['loss'].detach()):.3f}", rel=f"{history[-1]['rel']:.3f}")
    if bar is not None:
        bar.close()
    t_train = time.time() - t0

    if distributed:
        import torch.distributed as dist
        dist.barrier()
    if main_proc:
        t0 = time.time()
        metrics = evaluate(predict(model, val, device), [s["relations"] for s in val], len(PREDICATES), ks=KS)
        freq = frequency_baseline(train, len(OBJECT_CLASSES), len(PREDICATES))
        freq_metrics = evaluate(freq_predictions(freq, val), [s["relations"] for s in val], len(PREDICATES), ks=KS)
        t_eval = time.time() - t0
        out_dir = Path(args.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_loss_plot(history, out_dir / "loss.png")
        result = {
            "args": vars(args), "world_size": world, "device": str(device), "steps": steps,
            "model": metrics, "freq": freq_metrics, "final_losses": history[-1],
            "seconds": {"data": round(t_data, 1), "train": round(t_train, 1), "eval": round(t_eval, 1)},
            "num_parameters": sum(p.numel() for p in model.parameters()),
        }
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        print(f"{steps} steps x {args.batch_size} images ({world} process{'es' if world > 1 else ''}, {device}); "
              f"data {t_data:.1f} s, train {t_train:.1f} s, eval {t_eval:.1f} s")
        print(f"held-out: {metrics['num_images']} scenes with relations (seeds {args.val_seed}..{args.val_seed + args.val_scenes - 1})")
        print(format_table(metrics, freq_metrics))
        print(f"wrote {out_dir / 'loss.png'} and {out_dir / 'metrics.json'}")
    if distributed:
        import torch.distributed as dist
        dist.barrier()  # the other ranks wait for rank 0's evaluation: tearing gloo down early can abort
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
