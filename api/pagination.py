"""Cursor pagination over a table's integer `seq` (insertion order); the cursor on the wire is an object id.

`after=<id of the last item>` continues after that item in the list's order, so after the last item of the
last page the answer is `data: []` (SDKs older than 1.62 stop only on an empty page).
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from api.errors import bad_request

T = TypeVar("T")


def cursor_seq(
    session: Session, id_column: InstrumentedAttribute[str], seq_column: InstrumentedAttribute[int], after: str, *where: Any
) -> int:
    """The seq of the object `after` (among the rows matching `where`); 400 when there is none."""
    seq = session.scalar(select(seq_column).where(id_column == after, *where))
    if seq is None:
        raise bad_request(f"No object with id {after!r} to continue after.", param="after", code="invalid_value")
    return seq


def fetch_page(
    session: Session,
    query: Select[tuple[T]],
    seq_column: InstrumentedAttribute[int],
    *,
    after_seq: int | None,
    limit: int,
    newest_first: bool,
) -> tuple[list[T], bool]:
    """One page of `query` ordered by seq, and whether more follow."""
    if after_seq is not None:
        query = query.where(seq_column < after_seq if newest_first else seq_column > after_seq)
    query = query.order_by(seq_column.desc() if newest_first else seq_column.asc()).limit(limit + 1)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def fetch_page_after(session: Session, model: Any, where: list[Any], *, after: str | None, limit: int,
                     newest_first: bool) -> tuple[list[Any], bool]:
    """One page of `model`'s rows matching `where`, after the object with id `after` (a 400 when there is none)."""
    after_seq = cursor_seq(session, model.id, model.seq, after, *where) if after else None
    return fetch_page(session, select(model).where(*where), model.seq, after_seq=after_seq, limit=limit, newest_first=newest_first)
