import torch
import torch.nn.functional as F
import sgg_kernels as sk
from sgg_kernels.models import RDE, SILNetwork

torch.manual_seed(0)
# Two 256 x 384 images with 6 and 4 detections: boxes (x1, y1, x2, y2) in image pixels, as a detector gives them.
xy = torch.rand(10, 2) * torch.tensor([192.0, 128.0])
boxes_per_image = list(torch.cat([xy, xy + 32 + torch.rand(10, 2) * torch.tensor([160.0, 96.0])], 1).split([6, 4]))
fpn = [torch.randn(2, 256, 256 // s, 384 // s) for s in (4, 8, 16, 32)]  # the (frozen) detector's FPN, strides 4-32
num_obj, num_rel, dim = 151, 51, 512                                  # VG150 + bg, 50 predicates + none; feature width
labels = torch.randint(1, num_obj, (10,))                             # ground-truth object classes [K]

boxes, box_batch = sk.pack_boxes(boxes_per_image)                     # [K, 4], [K]; K = 10
pairs = sk.all_pairs(box_batch)                                       # [P, 2], every ordered pair per image; P = 42
rel_labels = torch.randint(0, num_rel, (pairs.shape[0],))             # ground-truth predicates [P] (0 = none)
sil = SILNetwork(dim=256, depth=2, num_centers=49, heads=4)           # clustering, intra-/cross-entity, dispatch
sil_map = sil(fpn[2], boxes, box_batch, spatial_scale=1 / 16)         # [B, 256, 16, 24] -> [B, 256, 16, 24]
# A stand-in for the baseline's relation head: union-box features of the SIL map -> rel_feats [P, dim].
rel_head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256 * 7 * 7, dim), torch.nn.ReLU())
rel_feats = rel_head(sk.union_roi_align(sil_map, boxes, box_batch, pairs, 7, 1 / 16, 2))  # [P, 256, 7, 7] -> [P, dim]
rel_classifier = torch.nn.Linear(dim, num_rel)                        # the baseline's predicate classifier
loss_pred = F.cross_entropy(rel_classifier(rel_feats), rel_labels)    # the baseline's own L_pred
rde = RDE(dim=dim, num_rel_classes=num_rel, num_obj_classes=num_obj, classifier=rel_classifier)  # training-time only
subj_labels, obj_labels = labels[pairs[:, 0]], labels[pairs[:, 1]]    # classes of each pair's subject and object [P]
losses = rde(rel_feats, rel_labels, subj_labels, obj_labels)          # proto, proto_sep, info, re, pred_rde, total
(loss_pred + losses["total"]).backward()                              # Eq. 6; RDE adds nothing at inference
print("sil_map", list(sil_map.shape), "rel_feats", list(rel_feats.shape), "losses", sorted(losses))
