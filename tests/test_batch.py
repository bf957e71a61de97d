"""Batch helpers: pack_boxes, pack_pairs, all_pairs (DESIGN.md, Data conventions)."""
import pytest
import torch

import sgg_kernels as sk


def test_pack_boxes_and_pairs_roundtrip():
    b0 = torch.tensor([[0, 0, 10, 10], [5, 5, 20, 20.0]])
    b1 = torch.zeros(0, 4)
    b2 = torch.tensor([[1, 2, 3, 4.0], [2, 3, 4, 5.0], [0, 0, 1, 1.0]])
    boxes, box_batch = sk.pack_boxes([b0, b1, b2])
    assert boxes.shape == (5, 4) and box_batch.tolist() == [0, 0, 2, 2, 2]
    pairs = sk.pack_pairs([torch.tensor([[0, 1], [1, 0]]), torch.zeros(0, 2, dtype=torch.long), torch.tensor([[2, 0]])], [2, 0, 3])
    assert pairs.tolist() == [[0, 1], [1, 0], [4, 2]]
    assert (box_batch[pairs[:, 0]] == box_batch[pairs[:, 1]]).all()


def test_all_pairs_counts_and_order():
    box_batch = torch.tensor([0, 0, 0, 1, 2, 2])
    pairs = sk.all_pairs(box_batch)
    assert pairs.tolist() == [[0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1], [4, 5], [5, 4]]
    big = torch.arange(4).repeat_interleave(80)  # SGDet: 80 boxes per image -> 6,320 pairs each
    assert sk.all_pairs(big).shape == (4 * 80 * 79, 2)
    assert sk.all_pairs(torch.zeros(0, dtype=torch.long)).shape == (0, 2)


def test_batch_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="boxes_per_image\\[1\\] must be a Tensor\\[K_i, 4\\]"):
        sk.pack_boxes([torch.zeros(2, 4), torch.zeros(2, 5)])
    with pytest.raises(IndexError, match="rel_pair_idxs\\[0\\] holds indices outside \\[0, 2\\)"):
        sk.pack_pairs([torch.tensor([[0, 2]])], [2])
    with pytest.raises(ValueError, match="has 1 images but num_objs has 2"):
        sk.pack_pairs([torch.tensor([[0, 1]])], [2, 3])
    with pytest.raises(ValueError, match="box_batch must be an int64 Tensor\\[K\\]"):
        sk.all_pairs(torch.zeros(3))
