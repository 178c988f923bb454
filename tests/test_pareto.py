"""Pareto fronts (rekd.search.pareto) against answers worked out by hand: dominance, non-dominated sorting,
NSGA-II's crowding distance and the hypervolume, in two and three objectives."""
import itertools
import math
import random

import pytest

from rekd.search import pareto

NAN = math.nan


def test_a_maximised_objective_is_negated_and_a_bad_mode_refused():
    assert pareto.minimised([0.9, 3.0], ["max", "min"]) == (-0.9, 3.0)
    with pytest.raises(ValueError, match="mode 'best'"):
        pareto.minimised([0.9], ["best"])


def test_dominance_needs_no_worse_everywhere_and_better_somewhere():
    assert pareto.dominates((1, 2), (2, 2)) and pareto.dominates((1, 1), (2, 3))
    assert not pareto.dominates((1, 2), (1, 2))  # equal points dominate neither way
    assert not pareto.dominates((1, 3), (2, 2)) and not pareto.dominates((2, 2), (1, 3))


def test_points_fall_into_successive_fronts_and_nan_points_come_last():
    points = [(1, 5), (2, 3), (4, 1), (3, 4), (5, 5), (NAN, 0), (2, 3)]
    assert pareto.nondominated_sort(points) == [[0, 1, 2, 6], [3], [4], [5]]
    assert pareto.pareto_front(points) == [0, 1, 2, 6]
    assert pareto.pareto_front([(NAN, 1)]) == [] and pareto.nondominated_sort([]) == []


def test_crowding_distance_is_the_normalised_gap_between_neighbours_and_infinite_at_the_extremes():
    points = [(0, 10), (1, 6), (3, 2), (4, 0)]  # one front; ranges 4 and 10
    crowding = pareto.crowding_distance(points, [0, 1, 2, 3])
    assert crowding[0] == crowding[3] == math.inf
    assert crowding[1] == pytest.approx((3 - 0) / 4 + (10 - 2) / 10)
    assert crowding[2] == pytest.approx((4 - 1) / 4 + (6 - 0) / 10)


def test_equal_points_get_equal_crowding_and_an_objective_without_range_adds_nothing():
    crowding = pareto.crowding_distance([(1, 5), (1, 5), (1, 7)], [0, 1])
    assert crowding[0] == crowding[1]
    flat = pareto.crowding_distance([(1, 1), (1, 1)], [0, 1])
    assert flat == {0: 0.0, 1: 0.0}


def test_the_order_is_front_then_crowding_then_index():
    points = [(3, 4), (0, 10), (1, 6), (3, 2), (4, 0), (9, 9)]
    # front 1 = 1, 2, 3, 4: the extremes 1 and 4 first (by index), then 2 (crowding 1.55) before 3 (1.35)
    crowding = pareto.crowding_distance(points, [1, 2, 3, 4])
    assert crowding[2] == pytest.approx(3 / 4 + 8 / 10) and crowding[3] == pytest.approx(3 / 4 + 6 / 10)
    assert pareto.order(points) == [1, 4, 2, 3, 0, 5]
    assert pareto.ahead_of(points, 3) == 3 and pareto.ahead_of(points, 1) == 0 and pareto.ahead_of(points, 5) == 5


def test_the_hypervolume_of_a_staircase_is_the_sum_of_its_boxes():
    points = [(1, 3), (2, 2), (3, 1)]
    assert pareto.hypervolume(points, (4, 4)) == pytest.approx(3 * 1 + 2 * 1 + 1 * 1)
    # dominated points, copies, points beyond the reference and NaN add nothing; order does not matter
    more = points[::-1] + [(3, 3), (2, 2), (5, 0), (NAN, 0)]
    assert pareto.hypervolume(more, (4, 4)) == pytest.approx(6)
    assert pareto.hypervolume([], (1, 1)) == 0


def test_the_hypervolume_in_three_objectives_follows_inclusion_exclusion():
    # three unit-deep slabs of a 2x2x2 box: 3 x 2 - 3 x 1 + 1
    assert pareto.hypervolume([(0, 1, 1), (1, 0, 1), (1, 1, 0)], (2, 2, 2)) == pytest.approx(4)
    rng = random.Random(1)
    points = [tuple(rng.random() for _ in range(3)) for _ in range(6)]
    # exact on a grid: a cell is dominated if some point is no worse in every coordinate
    cuts = sorted({0.0, 1.0, *(c for p in points for c in p)})
    exact = 0.0
    for lows in itertools.product(zip(cuts, cuts[1:]), repeat=3):
        corner = tuple(lo for lo, _ in lows)
        if any(all(p[m] <= corner[m] for m in range(3)) for p in points):
            exact += math.prod(hi - lo for lo, hi in lows)
    assert pareto.hypervolume(points, (1, 1, 1)) == pytest.approx(exact)


def test_the_normalised_hypervolume_is_a_share_of_the_box_between_ideal_and_reference():
    assert pareto.normalized_hypervolume([(0, 0)], (0, 0), (10, 2)) == pytest.approx(1.0)
    assert pareto.normalized_hypervolume([(5, 1)], (0, 0), (10, 2)) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pareto.normalized_hypervolume([(5, 1)], (0, 0), (0, 2))


def test_bounds_put_the_reference_a_tenth_of_the_range_past_the_worst_point():
    ideal, reference = pareto.bounds([(1, 10), (3, 20), (NAN, 0)])
    assert ideal == (1, 10) and reference == pytest.approx((3.2, 21))
    ideal, reference = pareto.bounds([(2, 5)])  # one point: a box that still has room
    assert ideal == (2, 5) and reference[0] > 2 and reference[1] > 5


def test_the_hypervolume_curve_has_one_step_per_completed_trial_even_when_two_trials_tie():
    from types import SimpleNamespace

    from rekd.search.front import make_front
    rows = [SimpleNamespace(trial_id=t, outcome="completed", values={"val_acc": a, "energy_uj": e}, epochs=2,
                            settings={}) for t, a, e in (("a", 0.9, 1.0), ("b", 0.9, 1.0), ("c", 0.8, 0.5))]
    events = [(1, "a", 1), (2, "a", 2), (3, "b", 1), (4, "b", 2), (5, "c", 1), (6, "c", 2)]
    front = make_front([("val_acc", "max"), ("energy_uj", "min")], rows, events)
    assert [r.trial_id for r in front.points] == ["a", "b", "c"]
    assert [step for step, _ in front.curve] == [2, 4, 6]
    assert front.curve[0][1] == front.curve[1][1] < front.curve[2][1]
