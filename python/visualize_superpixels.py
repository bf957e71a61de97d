"""SIL superpixel clustering (MM'23, Sec. 3.2) on a real photo, drawn like the paper's Fig. 5.

    python python/visualize_superpixels.py [--image astronaut|coffee|chelsea|camera] [--size 128]
        [--centers 49] [--iters 10] [--boxes "x1,y1,x2,y2;..."] [--out superpixels.png] [--device cpu]

Needs matplotlib and scikit-image (requirements-dev.txt); the photos ship with scikit-image, so
nothing is downloaded. The photo is resized (``--size``: ``HxW``, or one number for the longer
side) and every pixel becomes a point Q_i. Its feature F_i is a fixed random Fourier feature of
(CIE-Lab colour / sigma_c, x / sigma_s, y / sigma_s): F_i = sqrt(2/D) cos(W v_i + b) with W, b
drawn once from a seeded generator (a random 1x1 convolution with a cosine, no pretrained
weights). With this map the cosine similarity of Eq. 2 approximates a Gaussian kernel on colour
and position, so clustering by it behaves like SLIC (the paper's reference [1]).

Then exactly as a SIL block does: ``sk.grid_centers`` proposes C = per_dim^2 centers, Eq. 1
(``sk.knn_center_features``, k = ceil(M/C)) gives their initial features, and ``--iters`` rounds
of ``sk.superpixel_cluster`` (Eq. 2 + 3 fused) assign every point to its most similar center and
re-centre each cluster on the similarity-weighted mean of its points. The colour rides along as
extra value channels, so the last Eq. 3 also yields each superpixel's mean colour.

Panels: (1) the photo with its boxes, (2) the rough boxes a box-based pipeline sees, one flat mask
per box, (3) the superpixels (each coloured by its mean colour, boundaries in yellow), faded
outside the boxes, with the grid centers that fall inside a box marked (x). ``--boxes`` takes
boxes in the original photo's pixels; without it each photo has a few hand-placed ones.
"""
import argparse
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import skimage.data  # noqa: E402
from skimage.color import gray2rgb, rgb2lab  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402
from skimage.transform import resize  # noqa: E402
import torch  # noqa: E402

import sgg_kernels as sk  # noqa: E402
from _example_args import default_device, parse_device  # noqa: E402

# Hand-placed boxes (x1, y1, x2, y2) in the original photo's pixels, with a name each.
_BOXES = {
    "astronaut": [("head", 160, 20, 300, 180), ("suit", 15, 150, 375, 512), ("helmet", 285, 330, 505, 512),
                  ("flag", 0, 0, 90, 320)],
    "coffee": [("cup", 170, 25, 410, 290), ("saucer", 75, 60, 475, 385), ("spoon", 330, 60, 415, 330)],
    "chelsea": [("eye", 165, 95, 250, 172), ("eye", 305, 110, 382, 185), ("nose", 245, 210, 325, 268)],
    "camera": [("man", 0, 70, 335, 512), ("camera", 255, 150, 365, 230), ("tripod", 230, 230, 410, 512)],
}
# Colour bandwidth in CIE-Lab units (L in [0, 100]): 10 splits flat regions on shading and noise
# into fragments, 30 merges the face into the wall.
_SIGMA_COLOUR = 20.0
_BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def _parse_size(text: str, h0: int, w0: int):
    """``HxW`` -> (H, W); one number -> that many pixels on the longer side, aspect kept."""
    text = text.lower()
    if "x" in text:
        h, w = (int(v) for v in text.split("x"))
    else:
        n = int(text)
        scale = n / max(h0, w0)
        h, w = max(1, round(h0 * scale)), max(1, round(w0 * scale))
    if h < 2 or w < 2:
        raise SystemExit(f"--size must give at least 2x2 pixels, got {h}x{w}")
    return h, w


def _parse_boxes(text: str):
    boxes = []
    for i, part in enumerate(p for p in text.split(";") if p.strip()):
        vals = [float(v) for v in part.split(",")]
        if len(vals) != 4 or vals[2] <= vals[0] or vals[3] <= vals[1]:
            raise SystemExit(f"--boxes: each box is x1,y1,x2,y2 with x2 > x1 and y2 > y1, got {part!r}")
        boxes.append((f"box {i + 1}", *vals))
    return boxes


def point_features(lab: torch.Tensor, dim: int, sigma_colour: float, sigma_space: float, seed: int = 0) -> torch.Tensor:
    """``lab [H, W, 3]`` -> ``F [1, H*W, dim]``: random Fourier features of (Lab/sigma_c, x/sigma_s, y/sigma_s).

    <F_i, F_j> ~= exp(-|v_i - v_j|^2 / 2) and |F_i| ~= 1 (Rahimi & Recht), so the cosine of Eq. 2
    is close to a Gaussian kernel on colour and position.
    """
    H, W, _ = lab.shape
    points = sk.grid_points(H, W, device=lab.device)                          # [M, 2] (x, y), row-major
    v = torch.cat([lab.reshape(H * W, 3) / sigma_colour, points / sigma_space], dim=1)   # [M, 5]
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(5, dim, generator=gen).to(lab.device)
    phase = (torch.rand(dim, generator=gen) * 2 * math.pi).to(lab.device)
    return (math.sqrt(2.0 / dim) * torch.cos(v @ proj + phase)).unsqueeze(0)


def cluster_image(rgb: torch.Tensor, per_dim: int, iters: int, dim: int, compactness: float):
    """``rgb [H, W, 3]`` in [0, 1] -> (assign [H, W] int64, mean colour per cluster [C, 3], centers [C, 2])."""
    H, W, _ = rgb.shape
    M, C = H * W, per_dim * per_dim
    lab = torch.from_numpy(rgb2lab(rgb.cpu().numpy())).float().to(rgb.device)
    spacing = math.sqrt(M / C)                                                # grid step S between centers
    feats = point_features(lab, dim, sigma_colour=_SIGMA_COLOUR, sigma_space=spacing * compactness)   # [1, M, D]
    values = torch.cat([feats, rgb.reshape(1, M, 3)], dim=2)                  # colour rides along as values
    points = sk.grid_points(H, W, device=rgb.device)
    centers = sk.grid_centers(H, W, per_dim, device=rgb.device)               # Sec. 3.2: per_dim x per_dim
    center_values, _ = sk.knn_center_features(values, points, centers, math.ceil(M / C))   # Eq. 1
    D = feats.shape[2]
    for _ in range(iters):
        # Eq. 2 (assign to the most similar center) + Eq. 3 (similarity-weighted mean, anchored by
        # the center) in one op; the new center features seed the next round.
        center_values, assign, sim = sk.superpixel_cluster(feats, center_values[..., :D], values, center_values)  # Eq. 2 + 3
    return assign.reshape(H, W), center_values[0, :, D:].clamp(0, 1), centers


def draw(photo: np.ndarray, assign: np.ndarray, colours: np.ndarray, centers: np.ndarray, boxes, title: str, out: str):
    """The three panels of Fig. 5, all in the original photo's pixel coordinates."""
    h0, w0 = photo.shape[:2]
    h, w = assign.shape
    # Nearest-neighbour upsampling of the cluster map to the photo, so boundaries are drawn at full size.
    rows = np.minimum((np.arange(h0) * h) // h0, h - 1)
    cols = np.minimum((np.arange(w0) * w) // w0, w - 1)
    labels = assign[rows][:, cols]
    sp = colours[labels]
    inside = np.zeros((h0, w0), dtype=bool)
    for _, x1, y1, x2, y2 in boxes:
        inside[int(max(0, y1)):int(min(h0, y2)), int(max(0, x1)):int(min(w0, x2))] = True
    sp = np.where(inside[..., None], sp, 0.35 * sp + 0.65)                  # fade what no box covers
    sp[find_boundaries(labels, mode="inner")] = (1.0, 0.9, 0.0)

    rough = photo.astype(np.float64) / 255.0 * 0.45 + 0.55                   # flat, coloured box masks
    for i, (_, x1, y1, x2, y2) in enumerate(boxes):
        c = np.array(matplotlib.colors.to_rgb(_BOX_COLOURS[i % len(_BOX_COLOURS)]))
        sl = (slice(int(max(0, y1)), int(min(h0, y2))), slice(int(max(0, x1)), int(min(w0, x2))))
        rough[sl] = 0.5 * rough[sl] + 0.5 * c

    fig, axes = plt.subplots(1, 3, figsize=(15, 5 * h0 / w0 + 0.8))
    panels = [(photo, "image with boxes"), (rough, "rough boxes (one mask per box)"),
              (sp, f"superpixels inside the boxes ({len(colours)} centers)")]
    # Each grid center inside a box is marked once, in the colour of the smallest box holding it.
    xy = centers * np.array([w0 / w, h0 / h])                                 # grid centers in photo pixels
    owner = np.full(len(xy), -1)
    for i in sorted(range(len(boxes)), key=lambda i: -(boxes[i][3] - boxes[i][1]) * (boxes[i][4] - boxes[i][2])):
        _, x1, y1, x2, y2 = boxes[i]
        owner[(xy[:, 0] >= x1) & (xy[:, 0] <= x2) & (xy[:, 1] >= y1) & (xy[:, 1] <= y2)] = i
    for col, (ax, (img, name)) in enumerate(zip(axes, panels)):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
        for i, (label, x1, y1, x2, y2) in enumerate(boxes):
            c = _BOX_COLOURS[i % len(_BOX_COLOURS)]
            ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=c, linewidth=2))
            ax.text(x1 + 3, y1 + 3, label, color="white", fontsize=9, va="top",
                    bbox=dict(facecolor=c, edgecolor="none", pad=1.5, alpha=0.85))
            if col == 2:
                ax.scatter(xy[owner == i, 0], xy[owner == i, 1], s=30, marker="x", color=c, linewidths=2)
        ax.set_xlim(0, w0)
        ax.set_ylim(h0, 0)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default="astronaut", choices=sorted(_BOXES))
    parser.add_argument("--size", default="128", help="HxW to cluster at, or one number for the longer side (default 128)")
    parser.add_argument("--centers", type=int, default=49, help="C, a square number (the paper: 49 = 7x7)")
    parser.add_argument("--iters", type=int, default=10, help="rounds of Eq. 2 + 3 (1 = a single SIL pass)")
    parser.add_argument("--dim", type=int, default=256, help="feature width D of the random Fourier features")
    parser.add_argument("--compactness", type=float, default=0.5,
                        help="spatial bandwidth in grid steps: smaller gives rounder, more regular superpixels")
    parser.add_argument("--boxes", default=None, help='boxes in the photo\'s pixels, "x1,y1,x2,y2;x1,y1,x2,y2"')
    parser.add_argument("--out", default="superpixels.png")
    parser.add_argument("--device", default=default_device(), help="cpu or cuda (default: cuda if visible)")
    args = parser.parse_args()
    dev = parse_device(parser, args.device)
    per_dim = math.isqrt(args.centers)
    if per_dim < 1 or per_dim * per_dim != args.centers:
        raise SystemExit(f"--centers must be a square number (grid_centers proposes per_dim x per_dim), got {args.centers}")
    if args.iters < 1:
        raise SystemExit(f"--iters must be >= 1, got {args.iters}")

    photo = getattr(skimage.data, args.image)()
    if photo.ndim == 2:
        photo = gray2rgb(photo)
    h0, w0 = photo.shape[:2]
    H, W = _parse_size(args.size, h0, w0)
    if H * W < args.centers:
        raise SystemExit(f"--size {H}x{W} has {H * W} pixels, fewer than --centers {args.centers}")
    boxes = _parse_boxes(args.boxes) if args.boxes else _BOXES[args.image]
    small = resize(photo, (H, W), anti_aliasing=True)                        # float64 in [0, 1]
    rgb = torch.from_numpy(small).float().to(dev)

    start = time.perf_counter()
    assign, colours, centers = cluster_image(rgb, per_dim, args.iters, args.dim, args.compactness)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    sizes = torch.bincount(assign.flatten(), minlength=args.centers)
    print(f"{args.image} {h0}x{w0} -> clustered at {H}x{W} ({H * W} points, {args.centers} centers, "
          f"{args.iters} round{'s' if args.iters > 1 else ''} of Eq. 2 + 3) on {dev}: {elapsed * 1e3:.0f} ms")
    print(f"points per superpixel: min {sizes.min().item()}, max {sizes.max().item()}, empty {(sizes == 0).sum().item()}")
    title = (f"SIL superpixel clustering, skimage.data.{args.image}() at {H}x{W}: Eq. 1 KNN init, "
             f"{args.iters} x Eq. 2 + 3, {args.centers} centers")
    draw(photo, assign.cpu().numpy(), colours.cpu().numpy(), centers.cpu().numpy(), boxes, title, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
