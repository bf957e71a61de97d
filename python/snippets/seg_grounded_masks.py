import torch
import sgg_kernels as sk
from sgg_kernels.models import EdgeGrounding, GaussianPairMasks, MaskTransfer, ObjectGrounding

torch.manual_seed(0)
# Two 256 x 384 images with 6 and 4 detections: boxes (x1, y1, x2, y2) in image pixels, as a detector gives them.
xy = torch.rand(10, 2) * torch.tensor([192.0, 128.0])
boxes_per_image = list(torch.cat([xy, xy + 32 + torch.rand(10, 2) * torch.tensor([160.0, 96.0])], 1).split([6, 4]))
fpn = [torch.randn(2, 256, 256 // s, 384 // s) for s in (4, 8, 16, 32)]  # the (frozen) detector's FPN, strides 4-32
d_g, d_m = 150, 80                                                    # target classes (VG150), source classes (COCO)
det_logits = torch.randn(10, d_g + 1)                                 # the detector's class logits [K, 151]
label_scores = det_logits.softmax(-1)                                 # l_j: [K, d_g + 1], background included
mask_logits = torch.randn(10, d_m, 28, 28)                            # a COCO-trained mask head's logits per box
vg_glove, coco_glove = torch.randn(d_g, 300), torch.randn(d_m, 300)   # GloVe (300-d) of the class names; random here
vg_to_coco = {0: 4}                                                   # shared classes: VG150 airplane = COCO airplane, ...

boxes, box_batch = sk.pack_boxes(boxes_per_image)                     # [K, 4], [K]; K = 10
pairs = sk.all_pairs(box_batch)                                       # [P, 2], every ordered pair per image; P = 42
transfer = MaskTransfer(target_embeddings=vg_glove, source_embeddings=coco_glove, shared=vg_to_coco)  # Eq. 3
masks = transfer(mask_logits)                                         # Eq. 4: [K, d_m, 28, 28] -> [K, d_g, 28, 28]
roi_maps = sk.roi_align(fpn[0], boxes, box_batch, 28, 1 / 4, 2)       # z: [K, 256, 28, 28], on the masks' grid
z_hat = ObjectGrounding(256, d_g)(roi_maps, masks)                    # Eq. 5: [K, 256, 28, 28]
pair_masks = GaussianPairMasks(d_g, kernel_size=7, per="pair")        # the released code: kernels per pair and role
m_pair = pair_masks(masks, label_scores, pairs, boxes, out_size=14)   # Eq. 6 in the union-box frame: [P, d_g, 14, 14]
union_maps = sk.union_roi_align(fpn[0], boxes, box_batch, pairs, 14, 1 / 4, 2)  # z_{j,j'}: [P, 256, 14, 14]
z_hat_pair = EdgeGrounding(256, d_g)(union_maps, m_pair)              # Eq. 7: [P, 256, 14, 14]
# sk.pair_mask_conv reads each object's masks in place: no [P, d_g, 28, 28] gathered or smoothed copies
(z_hat.square().mean() + z_hat_pair.square().mean()).backward()       # stands in for the object and relation losses
print("masks", list(masks.shape), "z_hat", list(z_hat.shape), "m_pair", list(m_pair.shape),
      "z_hat_pair", list(z_hat_pair.shape))
