from __future__ import annotations

import pytest
from alembic import command

from ctdx.db import migrate


def test_upgrade_from_empty_reaches_head_and_matches_models(db_url: str) -> None:
    st = migrate.status(db_url)
    assert st.at_head and st.current == migrate.head_revision()
    # alembic check: the models and the migrations describe the same schema
    command.check(migrate.alembic_config(db_url))


def test_downgrade_to_base_and_up_again(db_url: str) -> None:
    cfg = migrate.alembic_config(db_url)
    command.downgrade(cfg, "base")
    assert migrate.status(db_url).current is None
    command.upgrade(cfg, "head")
    assert migrate.status(db_url).at_head


def test_0005_keeps_existing_slice_results_and_adds_frame_numbers(db_url: str) -> None:
    """A results database from before Enhanced CT upgrades in place: rows stay, frames fit."""
    import sqlalchemy as sa

    from ctdx.db.session import make_engine

    cfg = migrate.alembic_config(db_url)
    command.downgrade(cfg, "0004")
    engine = make_engine(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO studies (id, study_instance_uid, created_at) VALUES (1, '1.2.3', :t)"
            ), {"t": "2026-01-01 00:00:00+00:00"})
            conn.execute(sa.text(
                "INSERT INTO study_versions (id, study_id, version, state, first_received_at, "
                "last_received_at, instance_count) VALUES (1, 1, 1, 'analysed', :t, :t, 2)"
            ), {"t": "2026-01-01 00:00:00+00:00"})
            conn.execute(sa.text(
                "INSERT INTO analyses (id, study_version_id, state, model_name, model_version, "
                "model_uid, attempts, claimed_at, heartbeat_at) "
                "VALUES (1, 1, 'analysed', 'm', '1', '1.2.9', 1, :t, :t)"
            ), {"t": "2026-01-01 00:00:00+00:00"})
            for index in range(2):
                conn.execute(sa.text(
                    "INSERT INTO slice_results (analysis_id, sop_instance_uid, slice_index, "
                    "lung_fraction, skipped) VALUES (1, :sop, :i, 0.5, :f)"
                ), {"sop": f"1.2.3.{index}", "i": index, "f": False})
        command.upgrade(cfg, "head")
        with engine.begin() as conn:
            rows = conn.execute(sa.text(
                "SELECT sop_instance_uid, frame_number FROM slice_results ORDER BY slice_index"
            )).all()
            assert [tuple(r) for r in rows] == [("1.2.3.0", None), ("1.2.3.1", None)]
            # one Enhanced CT instance: many slices with one SOP Instance UID, told apart by frame
            for index, frame in ((2, 7), (3, 3)):
                conn.execute(sa.text(
                    "INSERT INTO slice_results (analysis_id, sop_instance_uid, frame_number, "
                    "slice_index, lung_fraction, skipped) VALUES (1, '1.2.4', :n, :i, 0.5, :f)"
                ), {"n": frame, "i": index, "f": False})
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            # a slice index twice in one analysis is refused
            conn.execute(sa.text(
                "INSERT INTO slice_results (analysis_id, sop_instance_uid, frame_number, "
                "slice_index, lung_fraction, skipped) VALUES (1, '1.2.4', 9, 3, 0.5, :f)"
            ), {"f": False})
        command.downgrade(cfg, "0004")
        command.upgrade(cfg, "head")
    finally:
        engine.dispose()
