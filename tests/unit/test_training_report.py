"""What a run reports (training.report)."""

from __future__ import annotations


def test_images_per_s_steady_is_images_over_wall_time():
    """#17: the steady rate is the images after the first step over the wall time from the end
    of the first step to the end of the last (time between steps counts), not a mean of rates."""
    from lorapipe.training.report import steady_rate

    # step 1 ends at 10 s (warm-up, excluded); then 4 images in 1 s, 4 images in 3 s
    assert steady_rate([4, 4, 4], [10.0, 11.0, 14.0]) == 8 / 4.0  # the mean of rates: 2.67
    assert steady_rate([2, 3, 1], [0.5, 1.0, 1.5]) == 4 / 1.0  # a short last batch counts as is
    assert steady_rate([4], [1.0]) is None and steady_rate([], []) is None
