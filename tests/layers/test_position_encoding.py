import math

import torch

from sparse_detr.layers.position_encoding import mask_sine_embedding, sine_embedding


def test_sine_embedding_interleaves_sin_and_cos():
    coords = torch.tensor([0.3, 1.7])
    emb = sine_embedding(coords, num_pos_feats=4, temperature=100.0)
    assert emb.shape == (2, 4)
    for i, c in enumerate(coords.tolist()):
        # channels 2k / 2k+1 share the wavelength 100^(2k/4)
        expected = [math.sin(c), math.cos(c), math.sin(c / 10.0), math.cos(c / 10.0)]
        assert torch.allclose(emb[i], torch.tensor(expected), atol=1e-6)


def test_position_embedding_normalizes_by_the_valid_extent():
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    pos = mask_sine_embedding(mask, num_pos_feats=8)
    assert pos.shape == (1, 16, 3, 4)
    # y channel 0 is sin((row + 1 - 0.5) / rows * 2pi), x channel 0 (channel 8) the same over columns
    rows = torch.sin((torch.arange(3) + 0.5) / 3 * 2 * math.pi)
    cols = torch.sin((torch.arange(4) + 0.5) / 4 * 2 * math.pi)
    assert torch.allclose(pos[0, 0, :, 0], rows, atol=1e-5)
    assert torch.allclose(pos[0, 8, 0, :], cols, atol=1e-5)


def test_position_embedding_ignores_padding():
    alone = mask_sine_embedding(torch.zeros(1, 3, 4, dtype=torch.bool), num_pos_feats=8)
    padded_mask = torch.ones(1, 5, 7, dtype=torch.bool)
    padded_mask[:, :3, :4] = False
    padded = mask_sine_embedding(padded_mask, num_pos_feats=8)
    assert torch.allclose(padded[:, :, :3, :4], alone, atol=1e-6)
