"""Every score column is defined once (ecif.influence.columns) and everything else follows it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ecif.influence import columns
from ecif.influence.scores import PairInfluence

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_carries_the_schema_table():
    assert columns.markdown_table() in README.read_text(), "regenerate the README's table: ecif.influence.columns.markdown_table()"


def test_the_influence_vector_holds_exactly_the_directional_columns():
    assert tuple(field.name for field in dataclasses.fields(PairInfluence)) == columns.DIRECTIONAL_COLUMNS


def test_every_column_has_a_sign_and_says_why_when_streaming_cannot_write_it():
    for column in columns.SCORE_COLUMNS:
        assert column.suspicious_sign in (-1.0, 1.0) and column.meaning and column.unit
        assert column.streamed or column.not_streamed_because, column.name
    assert set(columns.DETECTION_COLUMNS) <= set(columns.SUSPICION)
    assert set(columns.SELF_INFLUENCE_COLUMNS) <= {column.name for column in columns.SCORE_COLUMNS if column.streamed}


def test_streamed_scoring_names_what_it_leaves_out():
    from ecif.config import StreamingConfig
    from ecif.influence.streaming import columns_not_written

    assert set(columns_not_written(StreamingConfig(self_influence=True))) == {"misalignment", "clip_score", "loss"}
    assert set(columns_not_written(StreamingConfig())) == {"misalignment", "clip_score", "loss", *columns.SELF_INFLUENCE_COLUMNS}


def test_default_detector_weights_each_view_by_its_outliers_and_falls_back_without_clip_score():
    """``misalignment`` = the mean of z(−CLIP-score) and z(log first-order self-influence), each weighted by the
    fraction of pairs it puts beyond 2σ; `ecif detect` and the Review page use it, and streamed scores
    (no CLIP-score) fall back to the self-influence."""
    import numpy as np
    import pandas as pd

    from ecif.tasks.detect import default_detector, flag, misalignment, with_misalignment

    rng = np.random.default_rng(0)
    clip, self_influence = rng.normal(0.3, 0.1, 50), rng.gamma(2.0, 1e-4, 50)
    clip[:5] = -0.2  # a planted group that only the CLIP-score singles out
    logged = np.log(self_influence)
    clip_view, influence_view = (clip.mean() - clip) / clip.std(), (logged - logged.mean()) / logged.std()
    clip_weight, influence_weight = (clip_view > 2).mean(), max((influence_view > 2).mean(), 1e-3)
    assert clip_weight == 0.1 and influence_weight < clip_weight
    expected = (clip_weight * clip_view + influence_weight * influence_view) / (clip_weight + influence_weight)
    np.testing.assert_allclose(misalignment(clip, self_influence), expected, rtol=1e-12)
    scores = pd.DataFrame({"uid": [f"u{i}" for i in range(50)], "influence": rng.normal(0, 1e-4, 50),
                           "clip_score": clip, "self_influence_first_order": self_influence})
    assert default_detector(scores) == "misalignment"
    flagged = flag(scores, top_k=5)
    assert flagged["uid"].tolist() == [f"u{i}" for i in np.argsort(-expected, kind="stable")[:5]]
    streamed = scores.drop(columns="clip_score")
    assert default_detector(streamed) == "self_influence_first_order"
    assert "misalignment" not in with_misalignment(streamed).columns
    assert flag(streamed, top_k=3)["uid"].tolist() == [f"u{i}" for i in np.argsort(-self_influence, kind="stable")[:3]]
    # a column that is all the same contributes zeros instead of dividing by zero; a zero self-influence
    # ranks with the smallest positive one instead of going to log(0); with no outliers in either view
    # both get the floor weight, so the detector is their plain mean
    logged = np.log([1.0, 1.0, 2.0, 3.0])
    np.testing.assert_allclose(misalignment(np.full(4, 0.5), np.arange(4.0)), (logged - logged.mean()) / logged.std() / 2)
    # a stored column from an earlier definition is replaced by the current one
    stale = scores.assign(misalignment=0.0)
    np.testing.assert_allclose(with_misalignment(stale)["misalignment"], expected, rtol=1e-12)
