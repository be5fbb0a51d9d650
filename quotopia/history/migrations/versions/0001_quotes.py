"""The quotes table: one row per quote, keyed by (symbol, run_id, sequence).

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quotes",
        sa.Column("symbol", sa.String(32), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=False),
        sa.Column("time_us", sa.BigInteger(), nullable=False),
        sa.Column("price", sa.Double(), nullable=False),
        sa.Column("change_percent", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("symbol", "run_id", "sequence", name="pk_quotes"),
    )
    op.create_index("ix_quotes_symbol_time", "quotes", ["symbol", "time_us", "run_id", "sequence"])


def downgrade() -> None:
    op.drop_index("ix_quotes_symbol_time", table_name="quotes")
    op.drop_table("quotes")
