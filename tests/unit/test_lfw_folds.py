"""The LFW protocol's arithmetic, on synthetic scores (no model, no images)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.lfw import Pair, best_threshold, kfold_accuracy, lfw_image, parse_pairs


def test_best_threshold_splits_separable_scores_in_the_middle_of_the_gap() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    labels = np.array([False, False, False, True, True])
    assert best_threshold(scores, labels) == pytest.approx(0.5)


def test_best_threshold_maximises_accuracy_when_classes_overlap() -> None:
    scores = np.array([0.1, 0.4, 0.5, 0.6, 0.9, 0.95])
    labels = np.array([False, False, True, False, True, True])
    t = best_threshold(scores, labels)
    accuracy = np.mean((scores >= t) == labels)
    assert accuracy == pytest.approx(5 / 6)  # one of 0.5 (same) / 0.6 (different) must be wrong
    assert 0.4 < t < 0.9


def test_best_threshold_can_say_everything_matches() -> None:
    scores = np.array([0.2, 0.3, 0.4])
    assert best_threshold(scores, np.array([True, True, True])) < 0.2


def test_best_threshold_refuses_no_scores() -> None:
    with pytest.raises(ValueError):
        best_threshold(np.array([]), np.array([], bool))


def test_each_fold_is_judged_with_the_threshold_of_the_other_folds() -> None:
    # Fold 0 separates at 0.5, fold 1 at 0.75; each is tested with the other's.
    scores = np.array([0.6, 0.9, 0.4, 0.1, 0.8, 0.9, 0.7, 0.2])
    labels = np.array([True, True, False, False, True, True, False, False])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    result = kfold_accuracy(scores, labels, folds, np.ones(8, bool))
    assert result.thresholds.tolist() == pytest.approx([0.75, 0.5])
    assert result.accuracies.tolist() == pytest.approx([0.75, 0.75])  # 0.6 fails at 0.75; 0.7 passes 0.5
    assert result.mean == pytest.approx(0.75)
    assert result.std == pytest.approx(0.0)


def test_pairs_without_a_face_count_wrong_and_do_not_train() -> None:
    scores = np.array([0.9, 0.1, np.nan, 0.2, 0.8, 0.9, 0.1, 0.2])
    labels = np.array([True, False, False, False, True, True, False, False])
    folds = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    valid = ~np.isnan(scores)
    result = kfold_accuracy(scores, labels, folds, valid)
    assert result.accuracies.tolist() == pytest.approx([0.75, 1.0])
    assert np.all(np.isfinite(result.thresholds))


def test_ten_folds_of_perfect_scores_give_full_accuracy() -> None:
    rng = np.random.default_rng(7)
    labels = np.tile(np.repeat([True, False], 300), 10)
    scores = np.where(labels, rng.uniform(0.5, 1.0, labels.size), rng.uniform(-0.2, 0.3, labels.size))
    result = kfold_accuracy(scores, labels, np.repeat(np.arange(10), 600), np.ones(labels.size, bool))
    assert result.accuracies.size == 10
    assert result.mean == 1.0
    assert np.all((result.thresholds > 0.3) & (result.thresholds < 0.5))


def test_kfold_needs_two_folds() -> None:
    with pytest.raises(ValueError):
        kfold_accuracy(np.array([0.5]), np.array([True]), np.array([0]), np.array([True]))


def test_parse_pairs_reads_the_lfw_format() -> None:
    text = "2 1\nAl_Gore 1 2\nAl_Gore 1 Bo_Derek 3\nBo_Derek 1 2\nAl_Gore 2\tBo_Derek 1\n"
    assert parse_pairs(text) == [
        Pair(0, "Al_Gore/Al_Gore_0001.jpg", "Al_Gore/Al_Gore_0002.jpg", True),
        Pair(0, "Al_Gore/Al_Gore_0001.jpg", "Bo_Derek/Bo_Derek_0003.jpg", False),
        Pair(1, "Bo_Derek/Bo_Derek_0001.jpg", "Bo_Derek/Bo_Derek_0002.jpg", True),
        Pair(1, "Al_Gore/Al_Gore_0002.jpg", "Bo_Derek/Bo_Derek_0001.jpg", False),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",  # no header
        "2 1\nAl_Gore 1 2\nAl_Gore 1 Bo_Derek 3\n",  # fewer lines than the header says
        "1 1\nAl_Gore 1 Bo_Derek 3\nAl_Gore 1 2\n",  # mismatched line where a matched one belongs
    ],
)
def test_parse_pairs_rejects_malformed_files(text: str) -> None:
    with pytest.raises(ValueError):
        parse_pairs(text)


def test_lfw_image_names_follow_the_lfw_layout() -> None:
    assert lfw_image("George_W_Bush", 12) == "George_W_Bush/George_W_Bush_0012.jpg"
