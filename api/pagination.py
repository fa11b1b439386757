"""Cursor pagination over a table's integer `seq` (insertion order); the cursor on the wire is an object id.

`after=<id of the last item>` continues after that item in the list's order, so after the last item of the
last page the answer is `data: []` (SDKs older than 1.62 stop only on an empty page).
"""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from api.errors import bad_request
from core.db import owned_by

T = TypeVar("T")


def cursor_seq(
    session: Session, id_column: InstrumentedAttribute[str], seq_column: InstrumentedAttribute[int], after: str, *where: Any
) -> int:
    """The seq of the object `after` (among the rows matching `where`); 400 when there is none."""
    seq = session.scalar(select(seq_column).where(id_column == after, *where))
    if seq is None:
        raise bad_request(f"No object with id {after!r} to continue after.", param="after", code="invalid_value")
    return seq


def page_query(query: Select[tuple[T]], seq_column: InstrumentedAttribute[int], *, after_seq: int | None, limit: int,
               newest_first: bool, owner: tuple[InstrumentedAttribute[Any], Any] | None = None) -> Select[tuple[T]]:
    """`query` limited to one page (and one more row, to tell whether more follow), ordered by seq; `owner` (column,
    value) keeps one owner's rows, read along the (column, seq) index (core.db.owned_by says why it is not `=`)."""
    order: list[Any] = []
    if owner is not None:
        query = query.where(*owned_by(*owner))
        order.append(owner[0])
    if after_seq is not None:
        query = query.where(seq_column < after_seq if newest_first else seq_column > after_seq)
    order.append(seq_column)
    return query.order_by(*(column.desc() if newest_first else column.asc() for column in order)).limit(limit + 1)


def fetch_page(
    session: Session,
    query: Select[tuple[T]],
    seq_column: InstrumentedAttribute[int],
    *,
    after_seq: int | None,
    limit: int,
    newest_first: bool,
    owner: tuple[InstrumentedAttribute[Any], Any] | None = None,
) -> tuple[list[T], bool]:
    """One page of `query` (see page_query), and whether more follow."""
    rows = list(session.scalars(page_query(query, seq_column, after_seq=after_seq, limit=limit, newest_first=newest_first,
                                           owner=owner)))
    return rows[:limit], len(rows) > limit


def fetch_page_after(session: Session, model: Any, where: list[Any], *, after: str | None, limit: int,
                     newest_first: bool, owner: tuple[InstrumentedAttribute[Any], Any] | None = None) -> tuple[list[Any], bool]:
    """One page of `model`'s rows matching `where` (and of `owner`, see page_query), after the object with id `after`
    (a 400 when there is none)."""
    pinned = [owner[0] == owner[1]] if owner is not None else []
    after_seq = cursor_seq(session, model.id, model.seq, after, *where, *pinned) if after else None
    return fetch_page(session, select(model).where(*where), model.seq, after_seq=after_seq, limit=limit, newest_first=newest_first,
                      owner=owner)
