import torch
import sgg_kernels as sk
from sgg_kernels.models import GlobalContextEncoding, LinkNetHead, linknet_losses

torch.manual_seed(0)
# Two 256 x 384 images with 6 and 4 detections: boxes (x1, y1, x2, y2) in image pixels, as a detector gives them.
xy = torch.rand(10, 2) * torch.tensor([192.0, 128.0])
boxes_per_image = list(torch.cat([xy, xy + 32 + torch.rand(10, 2) * torch.tensor([160.0, 96.0])], 1).split([6, 4]))
fpn = [torch.randn(2, 256, 256 // s, 384 // s) for s in (4, 8, 16, 32)]  # the (frozen) detector's FPN, strides 4-32
num_obj, num_rel, dim = 151, 51, 512                                  # VG150 + bg, 50 predicates + none; feature width
det_logits = torch.randn(10, num_obj)                                 # the detector's class logits [K, 151]
labels = torch.randint(1, num_obj, (10,))                             # ground-truth object classes [K]

boxes, box_batch = sk.pack_boxes(boxes_per_image)                     # [K, 4], [K]; K = 10
pairs = sk.all_pairs(box_batch)                                       # [P, 2], every ordered pair per image; P = 42
rel_labels = torch.randint(0, num_rel, (pairs.shape[0],))             # ground-truth predicates [P] (0 = none)
box_head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256 * 7 * 7, dim), torch.nn.ReLU())
roi_feats = box_head(sk.roi_align(fpn[2], boxes, box_batch, 7, 1 / 16, 2))   # f_RoI: [K, 256, 7, 7] -> [K, dim]
union_head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 256 * 7 * 7, dim), torch.nn.ReLU())
union = sk.union_roi_align(fpn, boxes, box_batch, pairs, 7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 2)  # [P, 4*256, 7, 7]
union_feats = union_head(union)                                       # F: [P, dim]
gce = GlobalContextEncoding(256, num_obj)                             # Sec. 3.3.2, on the coarsest level
context, multilabel_logits = gce(fpn[-1])                             # c: [B, 256], Eq. 9's logits [B, 151]
head = LinkNetHead(roi_dim=dim, num_obj_classes=num_obj, num_rel_classes=num_rel, context_dim=256, union_dim=dim)
obj_logits, rel_logits = head(roi_feats, det_logits, context, boxes, box_batch, pairs, union_feats)
# rel_logits = fc4([E1s ⊙ E1o ⊙ F, K2(b_o|s)]) via sk.pairwise_edge_fusion: no [P, dim] product in memory
multilabel_targets = torch.zeros(2, num_obj).index_put((box_batch, labels), torch.tensor(1.0))  # [B, 151]
losses = linknet_losses(obj_logits, labels, rel_logits, rel_labels, multilabel_logits, multilabel_targets)  # Eq. 8-9, 16
sum(losses.values()).backward()
print("obj_logits", list(obj_logits.shape), "rel_logits", list(rel_logits.shape), "losses", sorted(losses))
