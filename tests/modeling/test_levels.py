import torch

from sparse_detr.modeling.levels import FlatLevels, valid_sizes


def _masks():
    # image 0 fills both levels; image 1 covers 3 x 2 of the 4 x 5 level and 2 x 1 of the 2 x 3 level
    masks = [torch.zeros(2, 4, 5, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)]
    masks[0][1, 3:] = True
    masks[0][1, :, 2:] = True
    masks[1][1, :, 1:] = True
    return masks


def test_valid_sizes_are_height_then_width():
    assert valid_sizes(_masks()[0]).tolist() == [[4, 5], [3, 2]]


def test_flat_levels_layout():
    masks = _masks()
    levels = FlatLevels.from_masks(masks)
    assert levels.shapes == [(4, 5), (2, 3)] and levels.num_tokens == 26
    assert levels.spatial_shapes.tolist() == [[4, 5], [2, 3]] and levels.level_start_index.tolist() == [0, 20]
    assert levels.padding_mask.shape == (2, 26) and levels.padding_mask[1].sum() == 26 - 6 - 2
    assert torch.allclose(levels.valid_ratios[1], torch.tensor([[2 / 5, 3 / 4], [1 / 3, 1.0]]))
    assert all(torch.equal(a, b) for a, b in zip(levels.level_masks(), masks))
    assert [t.shape for t in levels.split(torch.zeros(2, 26, 7))] == [(2, 20, 7), (2, 6, 7)]
