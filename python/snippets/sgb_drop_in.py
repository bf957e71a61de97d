import torch
from sgg_kernels.integrations.sgb import MotifsPairHead, UnionFeatureExtractor, boxlists_to_batch, split_pairs


class BoxList:  # what sgg_kernels reads of maskrcnn_benchmark's BoxList: bbox, size, mode, get_field, len
    def __init__(self, bbox, size, labels):
        self.bbox, self.size, self.mode, self.fields = bbox, size, "xyxy", {"labels": labels}

    def get_field(self, name):
        return self.fields[name]

    def __len__(self):
        return self.bbox.shape[0]


torch.manual_seed(0)
# Two 256 x 384 images with 6 and 4 detections: boxes (x1, y1, x2, y2) in image pixels, as a detector gives them.
xy = torch.rand(10, 2) * torch.tensor([192.0, 128.0])
boxes_per_image = list(torch.cat([xy, xy + 32 + torch.rand(10, 2) * torch.tensor([160.0, 96.0])], 1).split([6, 4]))
fpn = [torch.randn(2, 256, 256 // s, 384 // s) for s in (4, 8, 16, 32)]  # the (frozen) detector's FPN, strides 4-32
proposals = [BoxList(b, (384, 256), torch.randint(1, 151, (len(b),))) for b in boxes_per_image]
rel_pair_idxs = [torch.tensor([(i, j) for i in range(len(b)) for j in range(len(b)) if i != j]) for b in boxes_per_image]

# SGB's RelationFeatureExtractor (all-level pooling, rect masks, rect_conv, fc6, fc7) in chunks of pairs,
# recomputed in the backward; its state_dict keys are SGB's (load_state_dict of an SGB checkpoint's
# roi_heads.relation.union_feature_extractor.* works). mlp_head_dim is 4096 in SGB; 512 keeps this quick.
union_extractor = UnionFeatureExtractor(in_channels=256, mlp_head_dim=512, chunk_size=16)
union_feats = union_extractor(fpn, proposals, rel_pair_idxs)          # [P, 512], P = 42
# MotifPredictor's pair step: post_cat(cat(head[s], tail[o])) * union -> rel_compress + frequency bias,
# as one fused op over the per-object projections (no [P, 512] pair tensor); SGB's parameter names.
pair_head = MotifsPairHead(hidden_dim=128, pooling_dim=512, num_obj_classes=151, num_rel_classes=51)
batch = boxlists_to_batch(proposals, rel_pair_idxs)                   # packed boxes [K, 4], pairs [P, 2], counts
edge_ctx = torch.randn(len(batch.boxes), 128, requires_grad=True)     # the context decoder's output [K, 128]
obj_preds = torch.cat([p.get_field("labels") for p in proposals])     # predicted object classes [K]
rel_dists = pair_head(edge_ctx, obj_preds, batch.pairs, union_feats)  # [P, 51]
rel_dists.sum().backward()
per_image = split_pairs(rel_dists, batch.num_rels)                    # SGB's rel_dists.split(num_rels)
print("union_feats", list(union_feats.shape), "rel_dists", list(rel_dists.shape),
      "per image", [list(r.shape) for r in per_image])
