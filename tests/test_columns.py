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
