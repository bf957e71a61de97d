"""SIL superpixel clustering (MM'23, Sec. 3.2) on a feature map with the fused ops, as training code uses them.

    python python/superpixel_clustering.py [--device cuda] [--size 64x96]

Folds 4 heads into the batch, initialises 49 centers by KNN (Eq. 1), assigns and aggregates
(Eq. 2-3), applies a stand-in for H'/interaction, dispatches back to the points (Eq. 9), and runs
the backward pass. Prints shapes, the cluster sizes and the time of one forward+backward.
"""
import argparse
import math
import time

import torch

import sgg_kernels as sk
from _example_args import default_device, parse_device


def sil_clustering(fmap: torch.Tensor, heads: int, per_dim: int, alpha, beta, mix: torch.nn.Module):
    """``fmap [B, D, H, W]`` -> ``[B, D, H, W]``: Eq. 1, 2, 3, (H'), 9 with heads folded into the batch."""
    B, D, H, W = fmap.shape
    M, C = H * W, per_dim * per_dim
    x = fmap.flatten(2).transpose(1, 2)                                       # [B, M, D]
    x = x.reshape(B, M, heads, D // heads).transpose(1, 2).reshape(B * heads, M, D // heads)
    points, centers = sk.grid_points(H, W, device=fmap.device), sk.grid_centers(H, W, per_dim, device=fmap.device)
    center_feats, _ = sk.knn_center_features(x, points, centers, math.ceil(M / C))   # Eq. 1
    pooled, assign, sim = sk.superpixel_cluster(x, center_feats, alpha=alpha, beta=beta)  # Eq. 2 + 3
    center_out = mix(pooled)                                                  # stands in for H' and the interactions
    y = sk.cluster_dispatch(center_out, assign, sim, residual=x)              # Eq. 9
    y = y.reshape(B, heads, M, D // heads).transpose(1, 2).reshape(B, M, D)
    return y.transpose(1, 2).reshape(B, D, H, W), assign


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda if visible)")
    parser.add_argument("--size", default="32x48", help="feature map HxW (the paper's scale: 64x96)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    dev = parse_device(parser, args.device)
    H, W = (int(v) for v in args.size.split("x"))
    torch.manual_seed(0)
    heads = 4
    fmap = torch.randn(args.batch, args.dim, H, W, device=dev, requires_grad=True)
    alpha = torch.nn.Parameter(torch.ones(1, device=dev))
    beta = torch.nn.Parameter(torch.zeros(1, device=dev))
    mix = torch.nn.Linear(args.dim // heads, args.dim // heads).to(dev)
    start = time.perf_counter()
    out, assign = sil_clustering(fmap, heads, 7, alpha, beta, mix)
    out.square().mean().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    sizes = torch.bincount(assign[0], minlength=49)
    print(f"input {list(fmap.shape)} -> output {list(out.shape)} on {dev}")
    print(f"points per superpixel (first image, first head): min {sizes.min().item()}, max {sizes.max().item()}")
    print(f"grad norms: fmap {fmap.grad.norm():.4f}, alpha {alpha.grad.item():+.4f}, beta {beta.grad.item():+.4f}")
    print(f"one forward+backward: {elapsed * 1e3:.1f} ms (first call, includes warm-up)")


if __name__ == "__main__":
    main()
