"""Every kind of hostile histories value at once, for two tenants, through the whole
pipeline: one ``discovery_job`` run (discovery, conversations, enrichment) and one
``embedding_job`` run, with real resources on the test database.

Each good session must come out exactly as the source says (recounted with SQL),
each bad row or session must be rejected with its reason by the stage that meets
it, no stage may fail a crew or stop its queue on one bad item, and each tenant
must see its own rows only.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import dagster as dg
import psycopg
from psycopg import sql

from conversation_assets import reads
from conversation_assets.assets.conversations import conversations
from conversation_assets.assets.discovery import discovered_sessions
from conversation_assets.assets.embeddings import conversation_embeddings
from conversation_assets.assets.enrichment import enriched_conversations
from conversation_assets.store import conversation_id
from jobs import INCREMENTAL_RUN_CONFIG, discovery_job, embedding_job
from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource
from resources.summarizer import SummarizerResource
from tests.sources import add_crew, table_id

DAY = (datetime.now(UTC) - timedelta(days=1)).replace(hour=9, minute=0, second=0, microsecond=0)
TENANTS = {"acme": "a", "globex": "g"}  # client code: prefix of its crews and tables
BIG_CHARS = 5 * 2**20
DEEP_LEVELS = 3000
WHITESPACE_IDS = ["", "   ", "\n", "\t", "\u3000"]


@dataclass(frozen=True)
class Bad:
    """What discovery must say of a row: a reason starting with `starts` (the whole
    reason when `whole`), holding `holds`."""

    starts: str
    holds: str = ""
    whole: bool = True

    def matches(self, reason: str) -> bool:
        if self.whole:
            return reason == self.starts
        return reason.startswith(self.starts) and self.holds in reason


NO_TYPE = Bad('message has no "type"')
NOT_OBJECT = Bad("message is not a JSON object")
BLANK_ID = Bad("session_id is empty")
UNSTORABLE = "message cannot be stored as jsonb: "
NO_TIME = Bad("created_at ", "is no session time", whole=False)


@dataclass
class Crew:
    """A crew, its histories table, and what the test knows of the rows it wrote."""

    code: str
    client: str
    table: str
    has_time: bool
    bad_rows: dict[int, Bad] = field(default_factory=dict)
    deep_sessions: dict[str, int] = field(default_factory=dict)  # session: deep row id

    def add(
        self,
        conn: psycopg.Connection,
        session_id: str | int | None,
        body: str | None,
        at: datetime | str | None = DAY,
        bad: Bad | None = None,
    ) -> int:
        """One row (the message as JSON text, typed by its column); its id."""
        names = ["session_id", "message"] + (["created_at"] if self.has_time else [])
        values: list[Any] = [session_id, body] + ([at] if self.has_time else [])
        statement = sql.SQL(
            "INSERT INTO {table} ({columns}) VALUES ({values}) RETURNING id"
        ).format(
            table=table_id(self.table),
            columns=sql.SQL(", ").join(map(sql.Identifier, names)),
            values=sql.SQL(", ").join(sql.Placeholder() * len(values)),
        )
        row = conn.execute(statement, values).fetchone()
        assert row is not None
        if bad is not None:
            self.bad_rows[row[0]] = bad
        return row[0]


def say(kind: Any, content: Any) -> str:
    return json.dumps({"type": kind, "content": content, "additional_kwargs": {}})


def deep(levels: int = DEEP_LEVELS) -> str:
    """A message with a "type", nested deeper than Python's JSON parser goes."""
    return '{"type": "human", "content": "deep", "x": ' + "[" * levels + "]" * levels + "}"


def create_crew(
    conn: psycopg.Connection, code: str, client: str, table: str, columns: str | None
) -> Crew:
    """A crew on n8n's table (`columns` None) or on one with the given session_id and
    message column types ("integer jsonb") and a nullable created_at."""
    if columns is None:
        add_crew(conn, code, client, table, "n8n")
        return Crew(code, client, table, has_time=False)
    session_type, message_type = columns.split()
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (id serial PRIMARY KEY, session_id {}, message {}, "
            "created_at timestamptz)"
        ).format(table_id(table), sql.SQL(session_type), sql.SQL(message_type))
    )
    conn.execute(
        "INSERT INTO crews (crew_code, client_code, histories_table) VALUES (%s, %s, %s)",
        (code, client, table),
    )
    return Crew(code, client, table, has_time=True)


def fill_tenant(conn: psycopg.Connection, client: str, p: str) -> list[Crew]:
    """A tenant's four crews, each table holding good sessions beside hostile rows."""
    # n8n: jsonb, varchar(255) ids, no created_at (times come from discovery).
    n8n = create_crew(conn, f"{p}-n8n", client, f"{p}_n8n_histories", None)
    n8n.add(conn, "shared", say("human", f"hello from {client}"))
    n8n.add(conn, "shared", say("ai", f"hi {client}, how can I help?"))
    n8n.add(conn, f"big-{p}", say("human", f"BIG-{client} " + "z" * BIG_CHARS + " END"))
    n8n.add(conn, f"big-{p}", say("ai", "that is a long one"))
    n8n.add(conn, f"deep-{p}", say("human", "a normal first message"))
    n8n.deep_sessions[f"deep-{p}"] = n8n.add(conn, f"deep-{p}", deep())
    mixed = f"mixed-{p}"
    n8n.add(conn, mixed, say("human", f"the mixed session of {client}"))
    for kind in (7, ["human"], None, {"k": 1}):
        n8n.add(conn, mixed, say(kind, "typed oddly"), bad=NO_TYPE)
    n8n.add(conn, mixed, json.dumps({"content": "no type at all"}), bad=NO_TYPE)
    for body in ("[1, 2]", '"just text"', "42", "null", "true"):
        n8n.add(conn, mixed, body, bad=NOT_OBJECT)
    n8n.add(conn, mixed, say("ai", f"still answering {client}"))
    odd = f"odd-{p}"  # every JSON type as content: messages all the same
    for content in (42, ["part one", {"type": "text", "text": "part two"}, 3], {"k": "v"}):
        n8n.add(conn, odd, say("human", content))
    for content in (None, True, False, f"plain words of {client}"):
        n8n.add(conn, odd, say("ai", content))
    n8n.add(conn, f"silent-{p}", say("human", None))  # no text at all: no vector
    n8n.add(conn, f"silent-{p}", say("ai", {"empty": []}))
    for session_id in WHITESPACE_IDS:
        n8n.add(conn, session_id, say("human", "whose session is this?"), bad=BLANK_ID)

    # json: jsonb cannot hold every json text; nullable columns; times of any kind.
    js = create_crew(conn, f"{p}-json", client, f"{p}_json_histories", "text json")
    good = f"j-good-{p}"
    js.add(conn, good, say("human", f"json hello from {client} \\u00e9t\\u00e9"))
    js.add(conn, good, say("ai", f"json answer for {client}"), at=None)  # time unknown
    js.add(conn, "M" * 255, say("human", f"the longest id {client} may use"))
    mixed = f"j-mixed-{p}"
    js.add(conn, mixed, say("human", f"json mixed of {client}"))
    unstorable = [
        ('{"type": "human", "content": "nul \\u0000 here"}', "unsupported Unicode escape"),
        ('{"type": "ai", "content": "half an emoji \\ud800"}', "surrogate"),
        ('{"type": "ai", "content": "big", "n": 1e1000000}', "overflows numeric"),
    ]
    for body, holds in unstorable:
        js.add(conn, mixed, body, bad=Bad(UNSTORABLE, holds, whole=False))
    for at in ("infinity", "-infinity", "294276-12-31 23:00:00+00", "10000-01-01 00:00:00+00"):
        js.add(conn, mixed, say("ai", "a time that is none"), at=at, bad=NO_TIME)
    js.add(conn, mixed, say("ai", f"json mixed answer for {client}"))
    js.add(
        conn,
        "L" * 300,
        say("human", "too long"),
        bad=Bad("session_id is longer than 255 characters"),
    )
    js.add(conn, None, say("human", "nobody's"), bad=Bad("session_id is null"))
    js.add(conn, f"j-null-{p}", None, bad=Bad("message is null"))
    js.add(conn, "\u3000", say("human", "ideographic space"), bad=BLANK_ID)
    js.add(conn, f"j-deep-{p}", say("human", "json, then too deep"))
    js.deep_sessions[f"j-deep-{p}"] = js.add(conn, f"j-deep-{p}", deep())

    # integer ids, the same in both tenants.
    ints = create_crew(conn, f"{p}-int", client, f"{p}_int_histories", "integer jsonb")
    ints.add(conn, 101, say("human", f"integer hello from {client}"))
    ints.add(conn, 101, say("ai", "integer answer"))
    ints.add(conn, 101, say("ai", "from the end of time"), at="infinity", bad=NO_TIME)
    ints.add(conn, -7, say("human", f"negative session of {client}"))
    ints.add(conn, 0, say("human", f"session zero of {client}"))
    ints.add(conn, 0, say(1, "typed by a number"), bad=NO_TYPE)
    ints.add(conn, 5, say("human", "integer, then too deep"))
    ints.deep_sessions["5"] = ints.add(conn, 5, deep())

    # uuid ids (langchain-postgres' table: indexed, created_at NOT NULL).
    uuids = Crew(f"{p}-uuid", client, f"{p}_uuid_histories", has_time=True)
    add_crew(conn, uuids.code, client, uuids.table, "langchain")
    first, second, gone = (str(uuid.uuid5(uuid.NAMESPACE_URL, f"{client}/{n}")) for n in range(3))
    uuids.add(conn, first, say("human", f"uuid hello from {client}"))
    uuids.add(conn, first, "[]", bad=NOT_OBJECT)
    uuids.add(conn, first, say("ai", f"uuid answer for {client}"))
    uuids.add(conn, second, say("human", "before time began"), at="-infinity", bad=NO_TIME)
    uuids.add(conn, second, say("human", f"uuid second of {client}"))
    uuids.add(conn, gone, say("human", "only at infinity"), at="infinity", bad=NO_TIME)
    return [n8n, js, ints, uuids]


# --- the oracle: the source, recounted with SQL -------------------------------------------

# The rows the test did not write as bad, read as text first (a MATERIALIZED CTE: no
# cast is tried on a row before the filter drops it), then their counts and every
# text a transcript must show (a string content, or the string parts of a list).
RECOUNT = """
WITH kept AS MATERIALIZED (
    SELECT h.session_id::text AS session_id, h.message::text AS body
    FROM {table} AS h
    WHERE NOT (h.id = ANY(%(bad)s::bigint[]))
)
SELECT k.session_id, count(*)::int,
       (count(*) FILTER (WHERE k.body::jsonb ->> 'type' = 'human'))::int,
       (count(*) FILTER (WHERE k.body::jsonb ->> 'type' = 'ai'))::int,
       (SELECT coalesce(array_agg(t.text #>> '{{}}'), ARRAY[]::text[])
        FROM kept AS o,
             jsonb_path_query(o.body::jsonb, '$.content[*] ? (@.type() == "string")') AS t(text)
        WHERE o.session_id = k.session_id)
FROM kept AS k
GROUP BY k.session_id
"""


@dataclass(frozen=True)
class Expected:
    crew: Crew
    session_id: str
    messages: int
    human: int
    ai: int
    texts: list[str]

    @property
    def key(self) -> tuple[str, str]:
        return self.crew.code, self.session_id


def recount(conn: psycopg.Connection, crew: Crew) -> list[Expected]:
    rows = conn.execute(
        sql.SQL(RECOUNT).format(table=table_id(crew.table)), {"bad": list(crew.bad_rows)}
    ).fetchall()
    return [Expected(crew, *row) for row in rows]


# --- the run ------------------------------------------------------------------------------


def run_jobs(postgres: PostgresResource) -> dict[str, dg.RunResult]:
    """One discovery_job run (incremental, as the sensor launches it), then one
    embedding_job run; a run that fails raises."""
    defs = dg.Definitions(
        assets=[
            discovered_sessions,
            conversations,
            enriched_conversations,
            conversation_embeddings,
        ],
        jobs=[discovery_job, embedding_job],
        resources={
            "postgres": postgres,
            "embeddings": EmbeddingResource(backend="local"),
            "summarizer": SummarizerResource(),
        },
    )
    instance = dg.DagsterInstance.ephemeral()
    partition = DAY.date().isoformat()
    return {
        "discovery": defs.resolve_job_def("discovery_job").execute_in_process(
            run_config=INCREMENTAL_RUN_CONFIG, partition_key=partition, instance=instance
        ),
        "embedding": defs.resolve_job_def("embedding_job").execute_in_process(instance=instance),
    }


def metadata(result: dg.RunResult, node: str) -> dict[str, Any]:
    """The values of the materialization an asset's own run reported (not those it
    announced for other partitions)."""
    (own,) = [
        m
        for m in result.asset_materializations_for_node(node)
        if m.partition in (None, DAY.date().isoformat())
    ]
    return {name: value.value for name, value in own.metadata.items()}


# --- the test -------------------------------------------------------------------------------


def test_every_hostile_value_at_once_through_the_whole_pipeline(conn, postgres):
    crews = [crew for client, p in TENANTS.items() for crew in fill_tenant(conn, client, p)]

    results = run_jobs(postgres)

    # No stage failed a crew, left a queue behind, or stopped on one bad item.
    assert all(result.success for result in results.values())
    found = metadata(results["discovery"], "discovered_sessions")
    assert (found["crews_failed"], found["crew_errors"]) == (0, {})
    assert found["crews_succeeded"] == len(crews)
    built = metadata(results["discovery"], "conversations")
    assert (built["crew_errors"], built["queue_left"]) == ({}, 0)
    assert metadata(results["discovery"], "enriched_conversations")["queue_left"] == 0
    assert metadata(results["embedding"], "conversation_embeddings")["backlog_left"] == 0
    assert conn.execute(
        "SELECT count(*) FROM crew_discovery_status WHERE last_error IS NOT NULL"
    ).fetchone() == (0,)

    # Discovery rejected every bad row, each with the reason of its kind, and no other.
    rejected = {
        (crew_code, message_id): reason
        for crew_code, message_id, reason in conn.execute(
            "SELECT crew_code, message_id, reason FROM discovery_rejects"
        )
    }
    bad_rows = {(crew.code, i): bad for crew in crews for i, bad in crew.bad_rows.items()}
    assert set(rejected) == set(bad_rows)
    wrong = {key: rejected[key] for key, bad in bad_rows.items() if not bad.matches(rejected[key])}
    assert wrong == {}

    # The builder rejected each session it could not read, naming the row, and no other.
    deep_rejects = {
        f"{crew.code}/{session_id}": (crew.client, row_id)
        for crew in crews
        for session_id, row_id in crew.deep_sessions.items()
    }
    rejects = {
        key: (client, reason)
        for key, client, reason in conn.execute(
            "SELECT record_key, client_code, reason FROM conversation_rejects"
        )
    }
    assert set(rejects) == set(deep_rejects)
    for key, (client, row_id) in deep_rejects.items():
        assert rejects[key][0] == client
        assert rejects[key][1].startswith(f"histories row {row_id}: message is nested too deeply")
    assert conn.execute("SELECT count(*) FROM enrichment_rejects").fetchone() == (0,)

    # Every session discovery kept has the source's counts; every one the builder
    # could read is stored exactly, embedded and enriched, under its own client.
    expected = [e for crew in crews for e in recount(conn, crew)]
    discovered = {
        (row[0], row[1]): row[2:]
        for row in conn.execute(
            "SELECT crew_code, session_id, client_code, message_count, human_message_count, "
            "ai_message_count FROM discovered_sessions WHERE deleted_at IS NULL"
        )
    }
    assert discovered == {e.key: (e.crew.client, e.messages, e.human, e.ai) for e in expected}
    good = [e for e in expected if f"{e.crew.code}/{e.session_id}" not in deep_rejects]
    stored = {
        (row[0], row[1]): row[2:]
        for row in conn.execute(
            "SELECT c.crew_code, c.session_id, c.client_code, c.message_count, "
            "c.full_conversation, c.embedding IS NOT NULL, c.embedding_hash = c.content_hash, "
            "e.client_code, e.message_count "
            "FROM conversations AS c LEFT JOIN enriched_conversations AS e USING (id) "
            "WHERE c.deleted_at IS NULL"
        )
    }
    assert set(stored) == {e.key for e in good}
    for e in good:
        client, count, transcript, has_vector, embedded, enriched_client, enriched_count = stored[
            e.key
        ]
        assert (client, count, enriched_client, enriched_count) == (
            e.crew.client,
            e.messages,
            e.crew.client,
            e.messages,
        ), e.key
        missing = [text for text in e.texts if text.strip() and text.strip() not in transcript]
        assert missing == [], e.key
        assert embedded and has_vector == bool(transcript.strip()), e.key
    big = [e for e in good if e.session_id.startswith("big-")]
    assert len(big) == len(TENANTS) and all(len(stored[e.key][2]) > BIG_CHARS for e in big)

    # Each tenant sees its own conversations only, by the product's read.
    for client in TENANTS:
        page = reads.list_conversations(conn, client, page_size=100)
        mine = {conversation_id(e.crew.code, e.session_id) for e in good if e.crew.client == client}
        assert {c.id for c in page.items} == mine and page.total == len(mine)
        assert {c.client_code for c in page.items} == {client}
