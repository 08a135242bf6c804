from __future__ import annotations

from alembic import command

from db import migrate


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
