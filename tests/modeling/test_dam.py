import torch

from sparse_detr.modeling.dam import attention_map_to_flat_grid, dam_correlation, dam_target

# level 0: 4 x 4 tokens (0..15), level 1: 2 x 3 tokens (16..21)
SHAPES = torch.tensor([[4, 4], [2, 3]])
START = torch.tensor([0, 16])
S = 22


def _splat(points, weights):
    """points: list of (level, x, y) normalized; weights: list of attention weights; one query, head, point."""
    n = len(points)
    loc = torch.zeros(1, 1, n, 1, 2, 1, 2)
    att = torch.zeros(1, 1, n, 1, 2, 1)
    for q, ((lvl, x, y), w) in enumerate(zip(points, weights)):
        loc[0, 0, q, 0, lvl, 0] = torch.tensor([x, y])
        att[0, 0, q, 0, lvl, 0] = w
    return attention_map_to_flat_grid(loc, att, SHAPES, START, S)[0]


def test_bilinear_splat_at_x_times_w_without_half_pixel_shift():
    # (0.3, 0.55) on the 4 x 4 level is pixel (1.2, 2.2): neighbours (x, y) = (1, 2), (2, 2), (1, 3), (2, 3)
    dam = _splat([(0, 0.3, 0.55)], [0.5])
    expected = torch.zeros(S)
    expected[2 * 4 + 1] = 0.5 * 0.8 * 0.8
    expected[2 * 4 + 2] = 0.5 * 0.2 * 0.8
    expected[3 * 4 + 1] = 0.5 * 0.8 * 0.2
    expected[3 * 4 + 2] = 0.5 * 0.2 * 0.2
    assert torch.allclose(dam, expected, atol=1e-6)


def test_out_of_map_neighbours_are_dropped_and_levels_offset():
    # (0.95, 0.1) on level 0 is pixel (3.8, 0.4): the x = 4 neighbours fall outside
    # (0.5, 0.75) on the 2 x 3 level 1 is pixel (1.5, 1.5): the y = 2 neighbours fall outside
    dam = _splat([(0, 0.95, 0.1), (1, 0.5, 0.75)], [1.0, 2.0])
    expected = torch.zeros(S)
    expected[0 * 4 + 3] = 0.2 * 0.6
    expected[1 * 4 + 3] = 0.2 * 0.4
    expected[16 + 1 * 3 + 1] = 2.0 * 0.5 * 0.5
    expected[16 + 1 * 3 + 2] = 2.0 * 0.5 * 0.5
    assert torch.allclose(dam, expected, atol=1e-6)


def test_layers_heads_and_points_are_summed():
    torch.manual_seed(0)
    loc = torch.rand(2, 3, 5, 2, 2, 4, 2)  # [N, layers, Q, heads, levels, points, 2]
    att = torch.rand(2, 3, 5, 2, 2, 4)
    total = attention_map_to_flat_grid(loc, att, SHAPES, START, S)
    parts = sum(
        attention_map_to_flat_grid(
            loc[:, layer : layer + 1, :, h : h + 1], att[:, layer : layer + 1, :, h : h + 1], SHAPES, START, S
        )
        for layer in range(3)
        for h in range(2)
    )
    assert torch.allclose(total, parts, atol=1e-5)
    # points whose 4 neighbours are all inside spread all of their weight
    inner = attention_map_to_flat_grid(loc * 0.3 + 0.1, att, SHAPES, START, S)
    assert torch.allclose(inner.sum(1), att.sum((1, 2, 3, 4, 5)), atol=1e-4)


def test_target_takes_the_top_valid_tokens_per_image():
    dam = torch.tensor([[0.0, 5.0, 1.0, 3.0, 9.0], [2.0, 0.0, 0.0, 1.0, 0.0]])
    padding = torch.tensor([[False, False, False, False, True], [False, False, False, False, False]])
    target = dam_target(dam, padding, torch.tensor([2, 1]), k=2)
    assert target.tolist() == [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]]


def test_correlation_overall_and_per_level():
    dam = torch.zeros(1, S)
    dam[0, 0], dam[0, 5], dam[0, 16] = 1.0, 3.0, 4.0
    selected = torch.zeros(1, S)
    selected[0, 5] = selected[0, 16] = 1
    corr = dam_correlation(selected, dam, [(4, 4), (2, 3)])
    assert torch.allclose(corr, torch.tensor([7 / 8, 3 / 4, 1.0]))
