"""Mask primitives: exact counts, index tie-breaking, drop/grow semantics, N:M pattern."""

import pytest
import torch

from sparsetrain import mask_ops
from sparsetrain.errors import ConfigError


@pytest.mark.parametrize(
    ("numel", "sparsity", "keep"),
    [(100, 0.9, 10), (10, 0.25, 8), (10, 0.35, 7), (7, 0.0, 7), (3, 0.99, 0), (1000, 0.999, 1)],
)
def test_n_keep_rounds_half_up(numel, sparsity, keep):
    assert mask_ops.n_keep(numel, sparsity) == keep


@pytest.mark.parametrize(
    ("active", "fraction", "drop"),
    [(10, 0.3, 3), (7, 0.3, 2), (9, 0.5, 4), (5, 0.0, 0), (4, 1.0, 4)],
)
def test_n_drop_floors(active, fraction, drop):
    assert mask_ops.n_drop(active, fraction) == drop


@pytest.mark.parametrize("bad", [-0.1, 1.0, float("nan"), "x", None])
def test_check_sparsity_rejects(bad):
    with pytest.raises(ConfigError):
        mask_ops.check_sparsity(bad)


def test_topk_exact_count_and_lower_index_wins_ties():
    score = torch.tensor([1.0, 3.0, 2.0, 2.0, 2.0, 0.0])
    assert mask_ops.topk_mask(score, 3).tolist() == [False, True, True, True, False, False]
    assert mask_ops.topk_mask(torch.zeros(2, 3), 4).flatten().tolist() == [True] * 4 + [False] * 2
    assert int(mask_ops.topk_mask(score, 0).sum()) == 0
    assert bool(mask_ops.topk_mask(score, 99).all())


def test_topk_count_is_exact_on_random_ties():
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 3, (7, 11), generator=g).float()
    for k in range(score.numel() + 1):
        assert int(mask_ops.topk_mask(score, k).sum()) == k


def test_drop_lowest_only_touches_active_positions():
    score = torch.tensor([0.1, 5.0, 0.3, 0.2, 0.05, 4.0])
    mask = torch.tensor([True, True, True, True, False, False])
    kept = mask_ops.drop_lowest(score, mask, 2)
    # 0.05 and 4.0 are inactive: never "dropped", never kept.
    assert kept.tolist() == [False, True, True, False, False, False]
    assert not bool((kept & ~mask).any())


def test_drop_lowest_ties_drop_the_higher_index_and_clip():
    mask = torch.ones(4, dtype=torch.bool)
    assert mask_ops.drop_lowest(torch.ones(4), mask, 1).tolist() == [True, True, True, False]
    assert int(mask_ops.drop_lowest(torch.ones(4), mask, 9).sum()) == 0


def test_grow_highest_only_grows_inactive_positions():
    score = torch.tensor([9.0, 1.0, 3.0, 2.0, 8.0])
    mask = torch.tensor([True, False, False, False, True])
    grown = mask_ops.grow_highest(score, mask, 2)
    assert grown.tolist() == [True, False, True, True, True]
    # Clipped to the free positions; ties go to the lower index.
    assert bool(mask_ops.grow_highest(score, mask, 9).all())
    tie = mask_ops.grow_highest(torch.zeros(5), mask, 1)
    assert tie.tolist() == [True, True, False, False, True]


def test_drop_then_grow_may_regrow_a_just_dropped_position():
    weight = torch.tensor([0.1, 0.9, 0.8, 0.0])
    mask = torch.tensor([True, True, True, False])
    kept = mask_ops.drop_lowest(weight.abs(), mask, 1)
    regrown = mask_ops.grow_highest(torch.tensor([5.0, 0.0, 0.0, 1.0]), kept, 1)
    assert torch.equal(regrown, mask)


def test_drop_signed_drops_each_sign_separately():
    weight = torch.tensor([0.1, 0.2, 0.3, 0.4, -0.5, -0.6, -0.7, -0.8, 0.01, -0.02])
    mask = torch.tensor([True] * 8 + [False, False])
    kept = mask_ops.drop_signed(weight, mask, 0.25)
    # Smallest positive (0.1) and largest negative (-0.5); a plain magnitude drop of 2 would
    # take 0.1 and 0.2 instead. Inactive positions play no part.
    assert kept.tolist() == [False, True, True, True, False, True, True, True, False, False]
    magnitude = mask_ops.drop_lowest(weight.abs(), mask, 2)
    assert magnitude.tolist() == [False, False, True, True, True, True, True, True, False, False]


def test_drop_signed_counts_active_zeros_as_smallest_positive():
    weight = torch.tensor([0.0, 0.5, 0.4, -0.1, -0.2])
    kept = mask_ops.drop_signed(weight, torch.ones(5, dtype=torch.bool), 0.5)
    # Positives (0.0, 0.5, 0.4): floor(1.5) = 1 dropped, the zero; negatives: 1 dropped, -0.1.
    assert kept.tolist() == [False, True, True, False, True]


def test_random_mask_exact_and_seeded():
    a = mask_ops.random_mask(torch.Size([5, 7]), 12, mask_ops.generator_for(3, "w", 4))
    b = mask_ops.random_mask(torch.Size([5, 7]), 12, mask_ops.generator_for(3, "w", 4))
    c = mask_ops.random_mask(torch.Size([5, 7]), 12, mask_ops.generator_for(3, "w", 5))
    assert int(a.sum()) == 12 and torch.equal(a, b) and not torch.equal(a, c)
    d = mask_ops.random_mask(torch.Size([5, 7]), 12, mask_ops.generator_for(3, "v", 4))
    assert not torch.equal(a, d)


def test_global_topk_is_one_ranking_over_tensors():
    scores = {"a": torch.tensor([[1.0, 5.0]]), "b": torch.tensor([4.0, 1.0, 2.0])}
    masks = mask_ops.global_topk(scores, 3)
    assert masks["a"].tolist() == [[False, True]]
    assert masks["b"].tolist() == [True, False, True]
    # Tie between the two 1.0s: the earlier tensor's position wins.
    masks = mask_ops.global_topk(scores, 4)
    assert masks["a"].tolist() == [[True, True]] and masks["b"].tolist() == [True, False, True]


def test_nm_mask_pattern_linear():
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 0.0, 7.0, 7.0]])
    mask = mask_ops.nm_mask(score, 2, 4)
    # Group 1 keeps its two largest; group 2 ties at 0 and 7 go to the lower channel index.
    assert mask.tolist() == [[True, False, True, False, False, False, True, True]]
    one_of_two = mask_ops.nm_mask(torch.tensor([[1.0, 1.0, 0.0, 2.0]]), 1, 2)
    assert one_of_two.tolist() == [[True, False, False, True]]


def test_nm_mask_conv_groups_run_along_input_channels():
    g = torch.Generator().manual_seed(0)
    score = torch.randn(3, 8, 2, 2, generator=g)
    mask = mask_ops.nm_mask(score, 2, 4)
    groups = mask.movedim(1, -1).reshape(-1, 4)
    assert bool((groups.sum(dim=1) == 2).all())
    # Each kept entry beats each dropped one inside its group.
    values = score.movedim(1, -1).reshape(-1, 4)
    for v, m in zip(values, groups, strict=True):
        assert v[m].min() >= v[~m].max()


@pytest.mark.parametrize(
    ("shape", "n", "m"), [((4, 6), 2, 4), ((4,), 1, 2), ((4, 8), 3, 2), ((4, 8), 0, 4)]
)
def test_nm_mask_rejects_bad_layouts(shape, n, m):
    with pytest.raises(ConfigError):
        mask_ops.nm_mask(torch.ones(shape), n, m)


def _reference_topk(score, k):
    """Brute force: a stable sort of the negated scores puts ties in index order."""
    flat = score.reshape(-1)
    out = torch.zeros(flat.numel(), dtype=torch.bool)
    out[torch.sort(-flat, stable=True).indices[:k]] = True
    return out.view_as(score)


def _large_scores():
    """Scores big enough for the sampled top-k path (> 4 * 2**16 elements): random, heavily
    tied, and a pattern whose strided sample sees only one value (the fallback)."""
    g = torch.Generator().manual_seed(3)
    tied = torch.randint(0, 7, (700, 600), generator=g).float()
    striped = torch.zeros(700 * 600)
    striped[1::2] = torch.rand(striped[1::2].shape, generator=g)
    signed = torch.randn(700, 600, generator=g)
    signed.view(-1)[::5] = -float("inf")
    return {
        "random": torch.rand(700, 600, generator=g),
        "tied": tied,
        "striped": striped.view(700, 600),
        "with -inf": signed,
    }


@pytest.mark.parametrize("case", ["random", "tied", "striped", "with -inf"])
def test_topk_fast_path_equals_brute_force_on_large_inputs(case):
    score = _large_scores()[case]
    for k in (1, 777, 50_000, 210_000, score.numel() - 3):
        assert torch.equal(mask_ops.topk_mask(score, k), _reference_topk(score, k)), k


def test_topk_with_nan_is_unchanged_by_the_fast_path():
    score = torch.rand(700, 600, generator=torch.Generator().manual_seed(4))
    score.view(-1)[12345] = float("nan")
    flat = score.reshape(-1)
    kth = torch.topk(flat, 1000, sorted=False).values.min()  # what topk alone gives: NaN
    expected = (flat > kth) | torch.zeros_like(flat, dtype=torch.bool)
    assert torch.equal(mask_ops.topk_mask(score, 1000).reshape(-1), expected)


@pytest.mark.parametrize("case", ["random", "tied", "with -inf"])
@pytest.mark.parametrize("density", [0.02, 0.7])
def test_drop_and_grow_equal_the_full_masked_top_k(case, density):
    """Selecting among the candidates only gives the full-tensor answer, ties included."""
    score = _large_scores()[case]
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(score.shape, generator=g) < density
    active = int(mask.sum())
    inf = torch.tensor(-float("inf"))
    for n in (0, 1, active // 3, active):
        expected = _reference_topk(torch.where(mask, score, inf), active - n)
        assert torch.equal(mask_ops.drop_lowest(score, mask, n), expected), n
    free = mask.numel() - active
    for n in (1, free // 4, free):
        expected = mask | _reference_topk(torch.where(mask, inf, score), n)
        assert torch.equal(mask_ops.grow_highest(score, mask, n), expected), n
