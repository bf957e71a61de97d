import torch
import sgg_kernels as sk

# A SIL-style superpixel clustering step (Sec. 3.2) on a [B, D, H, W] feature map, 4 heads.
B, D, H, W, heads = 2, 256, 64, 96, 4
fmap = torch.randn(B, D, H, W, requires_grad=True)                   # e.g. stride-4 FPN level, two 256 x 384 images
x = fmap.flatten(2).transpose(1, 2)                                   # [B, M, D], M = H*W
x = x.reshape(B, H * W, heads, D // heads).transpose(1, 2).reshape(B * heads, H * W, D // heads)

points, centers = sk.grid_points(H, W), sk.grid_centers(H, W, 7)      # [M, 2], [49, 2]: 7 x 7 centers
k = -(-H * W // 49)                                                   # n_k = ceil(M / C)
center_feats, knn = sk.knn_center_features(x, points, centers, k)     # Eq. 1  (cache knn: sk.gather_mean)
alpha, beta = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.zeros(1))
pooled, assign, sim = sk.superpixel_cluster(x, center_feats, alpha=alpha, beta=beta)  # Eq. 2 + Eq. 3
# ... H', intra-/cross-entity interaction on `pooled` [B*heads, 49, D/heads] ...
y = sk.cluster_dispatch(pooled, assign, sim, residual=x)              # Eq. 9: [B*heads, M, D/heads]
y.square().mean().backward()                                          # gradients reach fmap, alpha, beta
print("pooled", list(pooled.shape), "assign", list(assign.shape), "y", list(y.shape),
      "fmap.grad", list(fmap.grad.shape))
