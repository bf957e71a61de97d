"""Scene-Graph-Benchmark BoxList adapters (sgg_kernels.integrations.sgb): packing, splitting, errors."""
import pytest
import torch

from helpers import BoxList  # the BoxList stand-in

from sgg_kernels.integrations import sgb


def _images():
    b0 = BoxList([[0, 0, 10, 10], [5, 5, 20, 30], [1, 2, 3, 4]], (40, 32))
    b1 = BoxList(torch.zeros(0, 4), (16, 24))  # an image with no boxes
    b2 = BoxList([[2, 2, 8, 9], [0, 1, 5, 5]], (10, 12))
    for b, labels in zip((b0, b1, b2), ([3, 1, 4], [], [1, 5])):
        b.add_field("labels", torch.tensor(labels, dtype=torch.int64))
    pairs = [torch.tensor([[0, 1], [2, 0], [1, 2]]), torch.zeros(0, 2, dtype=torch.int64), torch.tensor([[1, 0]])]
    return [b0, b1, b2], pairs


def test_pack_round_trip_with_pairs():
    proposals, rel = _images()
    batch = sgb.boxlists_to_batch(proposals, rel)
    assert isinstance(batch, sgb.SGBBatch)
    assert torch.equal(batch.boxes, torch.cat([p.bbox for p in proposals]))
    assert batch.box_batch.dtype == torch.int64 and batch.box_batch.tolist() == [0, 0, 0, 2, 2]
    assert batch.pairs.dtype == torch.int64
    assert batch.pairs.tolist() == [[0, 1], [2, 0], [1, 2], [4, 3]]  # image 2's offset is 3 + 0
    assert batch.num_objs == [3, 0, 2] and batch.num_rels == [3, 0, 1]
    assert batch.image_sizes == [(40, 32), (16, 24), (10, 12)]
    # both boxes of every pair in one image, and the split gives back each image's boxes / pairs
    assert (batch.box_batch[batch.pairs[:, 0]] == batch.box_batch[batch.pairs[:, 1]]).all()
    for p, part in zip(proposals, sgb.split_objects(batch.boxes, batch.num_objs)):
        assert torch.equal(part, p.bbox)
    offsets = [0, 3, 3]
    for r, off, part in zip(rel, offsets, sgb.split_pairs(batch.pairs, batch.num_rels)):
        assert torch.equal(part - off, r)
    labels = torch.cat([p.get_field("labels") for p in proposals])
    assert [t.tolist() for t in sgb.split_objects(labels, batch.num_objs)] == [[3, 1, 4], [], [1, 5]]


def test_pack_without_pairs_and_odd_images():
    proposals, _ = _images()
    batch = sgb.boxlists_to_batch(proposals)
    assert batch.pairs is None and batch.num_rels == [] and batch.num_objs == [3, 0, 2]
    # one image, no boxes, no pairs
    empty = sgb.boxlists_to_batch([BoxList(torch.zeros(0, 4), (5, 5))], [torch.zeros(0, 2, dtype=torch.int64)])
    assert empty.boxes.shape == (0, 4) and empty.box_batch.shape == (0,) and empty.pairs.shape == (0, 2)
    assert empty.num_objs == [0] and empty.num_rels == [0]
    assert sgb.split_pairs(torch.zeros(0, 7), empty.num_rels)[0].shape == (0, 7)
    # int32 local pairs are accepted and come out int64; tuples work as lists
    one = sgb.boxlists_to_batch((BoxList([[0, 0, 1, 1], [1, 1, 2, 2]], (3, 3)),),
                                (torch.tensor([[1, 0]], dtype=torch.int32),))
    assert one.pairs.dtype == torch.int64 and one.pairs.tolist() == [[1, 0]]
    # a converted xywh BoxList packs as its xyxy form
    b = BoxList([[1, 2, 4, 6]], (9, 9)).convert("xywh").convert("xyxy")
    assert sgb.boxlists_to_batch([b]).boxes.tolist() == [[1, 2, 4, 6]]


def test_split_keeps_trailing_dims_and_views():
    x = torch.arange(5 * 3.0).reshape(5, 3)
    parts = sgb.split_objects(x, [2, 0, 3])
    assert [p.shape for p in parts] == [(2, 3), (0, 3), (3, 3)]
    assert torch.equal(torch.cat(parts), x) and parts[2].data_ptr() == x[2:].data_ptr()
    assert [p.shape[0] for p in sgb.split_pairs(x, torch.tensor([4, 1]))] == [4, 1]


def test_adapter_errors():
    proposals, rel = _images()
    with pytest.raises(ValueError, match=r"proposals\[1\] is a BoxList in mode 'xywh'.*convert\(\"xyxy\"\)"):
        sgb.boxlists_to_batch([proposals[0], proposals[1].convert("xywh")])
    with pytest.raises(TypeError, match=r"proposals\[1\] must be a BoxList"):
        sgb.boxlists_to_batch([proposals[0], torch.zeros(2, 4)])
    with pytest.raises(TypeError, match="proposals must be a list of BoxList"):
        sgb.boxlists_to_batch(proposals[0])
    with pytest.raises(ValueError, match="proposals needs at least one image"):
        sgb.boxlists_to_batch([])
    with pytest.raises(ValueError, match="rel_pair_idxs has 2 images but proposals has 3"):
        sgb.boxlists_to_batch(proposals, rel[:2])
    with pytest.raises(TypeError, match="rel_pair_idxs must be a list"):
        sgb.boxlists_to_batch(proposals, torch.cat(rel))
    with pytest.raises(IndexError, match=r"rel_pair_idxs\[2\] holds indices outside \[0, 2\)"):
        sgb.boxlists_to_batch(proposals, [rel[0], rel[1], torch.tensor([[0, 2]])])
    with pytest.raises(IndexError, match=r"rel_pair_idxs\[1\] holds indices outside \[0, 0\)"):
        sgb.boxlists_to_batch(proposals, [rel[0], torch.tensor([[0, 0]]), rel[2]])
    with pytest.raises(ValueError, match=r"rel_pair_idxs\[0\] must be a Tensor\[P_i, 2\]"):
        sgb.boxlists_to_batch(proposals, [torch.tensor([0, 1]), rel[1], rel[2]])
    with pytest.raises(TypeError, match=r"rel_pair_idxs\[0\] must hold integer indices"):
        sgb.boxlists_to_batch(proposals, [rel[0].float(), rel[1], rel[2]])
    bad_size = BoxList([[0, 0, 1, 1]], (3.5, 2))
    with pytest.raises(ValueError, match=r"proposals\[0\].size must be the image size \(width, height\)"):
        sgb.boxlists_to_batch([bad_size])
    with pytest.raises(ValueError, match="x has 5 rows but num_objs sums to 4"):
        sgb.split_objects(torch.zeros(5, 2), [3, 1])
    with pytest.raises(ValueError, match="x has 4 rows but num_rels sums to 5"):
        sgb.split_pairs(torch.zeros(4), [3, 0, 2])
    with pytest.raises(ValueError, match="num_rels must be a list of ints >= 0"):
        sgb.split_pairs(torch.zeros(4), [5, -1])
    with pytest.raises(TypeError, match="x must be a tensor"):
        sgb.split_objects([1, 2], [2])
