"""Every public read takes a wrong argument as a ValueError naming it, never a TypeError
from deep inside nor a database error: the product turns it into a 400."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

import psycopg
import pytest

from conversation_assets import dashboards, reads

DAY = date(2026, 11, 20)
NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
SOME_ID = uuid.uuid4()
VECTOR = [0.1] * 256

CASES = [
    (reads.list_conversations, {"include_tags": 5}, "include_tags"),
    (reads.list_conversations, {"exclude_tags": [1]}, "exclude_tags"),
    (reads.list_conversations, {"page": "2"}, "page"),
    (reads.list_conversations, {"page_size": 2.5}, "page_size"),
    (reads.list_conversations, {"start": "2026-01-01"}, "start"),
    (reads.list_conversations, {"end": DAY}, "end"),
    (reads.list_conversations, {"search": 42}, "search"),
    (reads.list_conversations, {"search": "a\x1fb"}, "search"),
    (reads.list_conversations, {"user_id": 7}, "user_id"),
    (reads.list_conversations, {"channel": ["web"]}, "channel"),
    (reads.list_conversations, {"with_transcript": "yes"}, "with_transcript"),
    (reads.semantic_search, {"query_vector": VECTOR, "k": "5"}, "k"),
    (reads.semantic_search, {"query_vector": VECTOR, "ef_search": None}, "ef_search"),
    (reads.semantic_search, {"query_vector": VECTOR, "max_scan_tuples": 1.0}, "max_scan_tuples"),
    (reads.semantic_search, {"query_vector": VECTOR, "user_id": 1}, "user_id"),
    (reads.exact_search, {"query_vector": VECTOR, "k": True}, "k"),
    (reads.conversation_stats, {"user_id": "u", "days": "30"}, "days"),
    (reads.conversation_stats, {"user_id": None}, "user_id"),
    (reads.set_status, {"conversation_id": SOME_ID, "status": 3}, "status"),
    (reads.add_tags, {"conversation_id": SOME_ID, "tags": None}, "tags"),
    (reads.add_tags, {"conversation_id": SOME_ID, "tags": "vip"}, "tags"),
    (reads.get_conversation, {"conversation_id": 12}, "conversation_id"),
    (reads.get_conversation, {"conversation_id": SOME_ID, "include_deleted": 1}, "include_deleted"),
    (dashboards.top_channels, {"first_day": DAY, "last_day": DAY, "limit": "5"}, "limit"),
    (dashboards.top_channels, {"first_day": DAY, "last_day": DAY, "limit": 0}, "limit"),
    (dashboards.daily_series, {"first_day": "2026-11-01", "last_day": DAY}, "first_day"),
    (dashboards.daily_series, {"first_day": DAY, "last_day": NOW}, "last_day"),
    (dashboards.last_24_hours, {"now": "now"}, "now"),
    (dashboards.last_24_hours, {"now": datetime(2026, 11, 20)}, "now"),  # noqa: DTZ001
]


@pytest.mark.parametrize(
    ("read", "kwargs", "named"),
    CASES,
    ids=[f"{read.__name__}-{'-'.join(kwargs)}" for read, kwargs, _ in CASES],
)
def test_a_wrong_argument_is_a_value_error_naming_it(
    conn: psycopg.Connection, read, kwargs, named
) -> None:
    with pytest.raises(ValueError, match=named):
        read(conn, "acme", **kwargs)


@pytest.mark.parametrize("read", [reads.list_conversations, reads.conversation_stats])
def test_a_client_code_that_is_not_text_is_a_value_error(conn: psycopg.Connection, read) -> None:
    kwargs = {"user_id": "u"} if read is reads.conversation_stats else {}
    with pytest.raises(ValueError, match="client_code"):
        read(conn, 5, **kwargs)


def test_no_tag_filter_may_be_given_as_none(conn: psycopg.Connection) -> None:
    page = reads.list_conversations(conn, "acme", include_tags=None, exclude_tags=None)
    assert page.total == 0 and page.items == []
