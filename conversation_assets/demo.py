"""Realistic chat histories for the demo, the tests and the benchmarks.

Everything is generated inside PostgreSQL by one set-based ``INSERT ... SELECT`` over
``generate_series``, so ten million rows take seconds, not minutes. Every random
choice is a hash of (seed, session, message), never ``random()``, so a seed always
produces the same rows whatever plan or worker count PostgreSQL picks.

The tables take the three shapes seen in the wild; discovery reads each of them
past its ``id`` (the one column all three have) and uses ``created_at`` where
there is one (docs/design.md shows where the rows flow next):

- ``n8n``: ``id SERIAL``, ``session_id VARCHAR(255)``, ``message JSONB``; no
  ``created_at`` and no index on ``session_id``; content at the top level.
- ``langchain``: langchain-postgres's ``session_id UUID`` (indexed), ``created_at``,
  content nested under ``data``; a turn's human and AI messages share one
  ``created_at``; some system and tool messages.
- ``n8n_created_at``: n8n's shape plus ``created_at`` with an index on it.

A shape only chooses a table's DDL and its generated rows; no database stores its
name, and the demo's tables are named after their crews.
"""

from __future__ import annotations

from datetime import UTC, datetime

import psycopg
from psycopg import sql

from conversation_assets import locks
from conversation_assets.queries import query

HISTORY_SHAPES = ("n8n", "langchain", "n8n_created_at")

# Session lengths: 2 * U^(-1/alpha) (a Pareto tail), capped. Most sessions have 2-10
# messages, about 1 in 90 has 100 or more, the mean is about 10.
_LENGTH_ALPHA = 1.15
_LENGTH_CAP = 1500
# Masks a hash to a non-negative bigint, and its top 53 bits to a fraction in [0, 1).
_MASK = 4_611_686_018_427_387_903
_MESSAGES_PER_NEW_SESSION = 4
_RECENT_ROWS = 5_000

_HUMAN = [
    "Hi! My order hasn't arrived yet, can you check?",
    "Bonjour, ma commande n'est toujours pas arrivée 📦",
    "¿Puedo cambiar la dirección de envío de mi pedido?",
    "注文をキャンセルしたいのですが、可能ですか？",
    "Wie lange dauert die Lieferung nach Österreich?",
    "My invoice shows the wrong amount 😕",
    "Can I get a refund for the damaged item?",
    "我的账户无法登录，怎么办？",
    "Merci beaucoup, c'est réglé ! 🙏",
    "Olá, preciso de ajuda com o pagamento por cartão.",
    "Привет! Как сбросить пароль?",
    "The app crashes when I open settings 🐛",
    "Do you ship to Zürich or only to Genève?",
    "배송 조회는 어디서 하나요?",
    "Is the café au lait blend back in stock? ☕",
    "I was charged twice this month, please help",
    "Can I upgrade my plan to the annual one?",
    "Hola, ¿tienen descuentos para estudiantes? 🎓",
    "The tracking number says 'délai dépassé'",
    "How do I export my data as CSV?",
    "Thanks, that worked 👍",
    "Ich möchte meine Adresse ändern.",
    "Why was my account suspended?",
    "Quero falar com um atendente humano, por favor.",
]
_AI = [
    "I'm sorry about the delay! Let me look that up for you.",
    "Bien sûr ! Je vérifie votre commande tout de suite.",
    "Claro, puedo ayudarte con eso.",
    "かしこまりました。ご注文番号を教えていただけますか？",
    "Die Lieferung dauert in der Regel 3–5 Werktage.",
    "I've found your invoice and corrected the amount. ✅",
    "A refund has been issued; it takes 5–10 business days to appear.",
    "请尝试通过“忘记密码”链接重置密码。",
    "De rien, bonne journée ! ☀️",
    "Você pode atualizar o cartão em Configurações → Pagamento.",
    "Нажмите «Забыли пароль?» на странице входа.",
    "Thanks for reporting this 🐛 — which version of the app are you using?",
    "We ship to all of Switzerland, including Zürich and Genève.",
    "주문 내역 페이지에서 배송 조회가 가능합니다.",
    "Good news: it's back in stock ☕",
    "I can see two charges; the duplicate will be reversed within 48 h.",
    "You can switch to annual billing under Plan → Change plan.",
    "¡Sí! Ofrecemos un 20 % de descuento con correo universitario 🎓",
    "Your data can be exported from Settings → Export (CSV or JSON).",
    "I'm transferring you to a colleague now.",
]
_AI_FOLLOW_UP = [
    "Is there anything else I can help with?",
    "Y a-t-il autre chose que je puisse faire pour vous ?",
    "¿Algo más en lo que pueda ayudarte?",
    "他にご不明な点はございますか？",
    "Kann ich sonst noch etwas für Sie tun?",
    "Let me know if that helps 🙂",
    "还有其他问题吗？",
    "Reference: see the order history page.",
]
_TOOL = [
    '{"order": "shipped", "carrier": "DHL", "eta": "2 days"}',
    '{"invoice": "corrected", "amount": "49.90 €"}',
    '{"refund": "issued", "status": "pending"}',
    '{"account": "active", "plan": "pro"}',
]
_SYSTEM = [
    "You are a helpful support assistant. Answer in the customer's language.",
    "Tu es un assistant du service client. Sois concis et poli.",
    "You are the sales assistant of a small online café ☕. Never invent prices.",
]


def _table_identifier(table: str) -> sql.Identifier:
    """``schema.table`` or ``table``, each part quoted on its own."""
    parts = table.split(".")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"table name {table!r} must be 'table' or 'schema.table'")
    return sql.Identifier(*parts)


def _check_shape(shape: str) -> None:
    if shape not in HISTORY_SHAPES:
        raise ValueError(f"unknown history shape {shape!r}; expected one of {HISTORY_SHAPES}")


# Per shape: session_id's type, whether rows carry created_at, and the one index
# the real schema has beside the primary key (n8n has none).
_SHAPE_DDL: dict[str, tuple[str, bool, str | None]] = {
    "n8n": ("VARCHAR(255)", False, None),
    "langchain": ("UUID", True, "session_id"),
    "n8n_created_at": ("VARCHAR(255)", True, "created_at"),
}


def create_histories_table(conn: psycopg.Connection, table: str, shape: str) -> None:
    """Create the histories table in one of the real shapes, if it is missing."""
    _check_shape(shape)
    ident = _table_identifier(table)
    name = table.split(".")[-1]
    session_type, has_created_at, indexed = _SHAPE_DDL[shape]
    created_at = ", created_at TIMESTAMPTZ NOT NULL DEFAULT now()" if has_created_at else ""
    with conn.transaction():
        conn.execute(
            query(
                "demo_create_histories_table",
                table=ident,
                session_type=sql.SQL(session_type),  # type: ignore[arg-type]
                created_at=sql.SQL(created_at),  # type: ignore[arg-type]
            )
        )
        if indexed:
            conn.execute(
                query(
                    "demo_create_histories_index",
                    index=sql.Identifier(f"{name}_{indexed}_idx"[:63]),
                    table=ident,
                    column=sql.Identifier(indexed),
                )
            )


def _hash(expression: str, purpose: int) -> sql.Composed:
    """A non-negative bigint hash of ``expression`` under the seed, one per purpose."""
    return query(
        "demo_hash",
        expression=sql.SQL(expression),  # type: ignore[arg-type]
        purpose=sql.Literal(purpose),
    )


def _fraction(expression: str, purpose: int) -> sql.Composed:
    """The same hash as a fraction in [0, 1): its top 53 bits over 2^53."""
    return query("demo_fraction", hash=_hash(expression, purpose))


def _session_id(shape: str, key: sql.Composable) -> sql.Composable:
    """A session id from a text key: UUIDs for LangChain (and n8n's chat trigger)."""
    return query(f"demo_{shape}_session_id", key=key)


def _message(shape: str) -> sql.Composable:
    """The JSONB message of a generated row ``m`` (kind, type, hash ``h``).

    kind 0 is a well-formed message; 1 has no "type", 2 is a JSON string instead of
    an object, 3 is well-formed (its row gets an empty session id).
    """
    content = query("demo_message_content")
    kwargs = query("demo_message_kwargs")
    return query(
        "demo_message",
        no_type=query(f"demo_{_message_kind(shape)}_message_no_type", content=content),
        content=content,
        well_formed=query(f"demo_{_message_kind(shape)}_message", content=content, kwargs=kwargs),
    )


def _message_kind(shape: str) -> str:
    """The message format of a shape: LangChain's, or n8n's (both n8n shapes)."""
    return "langchain" if shape == "langchain" else "n8n"


def _texts() -> dict[str, list[str] | int]:
    """The phrase lists and their lengths, as query parameters."""
    texts = {"human": _HUMAN, "ai": _AI, "follow": _AI_FOLLOW_UP, "tool": _TOOL, "system": _SYSTEM}
    return {**texts, **{f"n_{name}": len(values) for name, values in texts.items()}}


def _columns(shape: str) -> tuple[sql.Composable, sql.Composable]:
    """Insert column list and the matching select list over a generated row ``m``."""
    if shape == "n8n":
        return sql.SQL("session_id, message"), sql.SQL("m.session_id, {}").format(_message(shape))
    return (
        sql.SQL("session_id, message, created_at"),
        sql.SQL("m.session_id, {}, m.created_at").format(_message(shape)),
    )


def fill_histories(
    conn: psycopg.Connection,
    table: str,
    shape: str,
    *,
    sessions: int,
    seed: int,
    start: datetime | None = None,
    days: int = 14,
    malformed: int = 0,
) -> int:
    """Append ``sessions`` sessions (plus ``malformed`` bad rows); return the rows added.

    Sessions start over the ``days`` days before ``start`` (default now); rows are
    inserted in time order, so ids follow ``created_at`` as in a live product.
    """
    _check_shape(shape)
    if sessions < 0 or malformed < 0 or days < 0:
        raise ValueError("sessions, malformed and days must not be negative")
    start = start or datetime.now(UTC)
    insert_cols, select_cols = _columns(shape)
    # Within a LangChain turn, the human and AI messages share one created_at.
    pair = "(k.k + s.system::int) / 2" if shape == "langchain" else "k.k"
    message_key = "s.n::bigint * 1048576 + "  # session * 2^20 + message number
    generated = query(
        "demo_generated_rows",
        pair=sql.SQL(pair),
        u_jitter=_fraction(message_key + pair, 4),
        h_tool=_hash(message_key + pair, 6),
        h_content=_hash(message_key + "k.k", 7),
        u_back=_fraction("l.n", 2),
        h_system=_hash("l.n", 5),
        h_tools=_hash("l.n", 8),
        u_len=_fraction("n", 1),
        u_step=_fraction("n", 3),
        u_bad=_fraction("-i.i", 9),
        h_bad=_hash("-i.i", 7),
    )
    sid = _session_id(shape, sql.SQL("'fill:' || %(seed)s::text || ':' || g.s::text"))
    if shape != "langchain":  # a UUID column cannot hold the empty session id
        sid = sql.SQL("CASE WHEN g.kind = 3 THEN '' ELSE {} END").format(sid)
    statement = query(
        "demo_fill_histories",
        table=_table_identifier(table),
        insert_cols=insert_cols,
        select_cols=select_cols,
        sid=sid,
        generated=generated,
    )
    params = {
        "seed": seed,
        "mask": _MASK,
        "start": start,
        "days": days,
        "sessions": sessions,
        "malformed": malformed,
        "cap": _LENGTH_CAP,
        "alpha": _LENGTH_ALPHA,
        "langchain": shape == "langchain",
        "malformed_kinds": 2 if shape == "langchain" else 3,
        **_texts(),
    }
    with conn.transaction():
        # The time-order sort is narrow (four scalars a row): let it stay in memory,
        # then give an enclosing transaction its own setting back.
        row = conn.execute(query("current_work_mem")).fetchone()
        conn.execute(query("set_local_work_mem"), {"work_mem": "512MB"})
        added = conn.execute(statement, params).rowcount
        conn.execute(query("set_local_work_mem"), {"work_mem": row[0] if row else "4MB"})
        return added


def add_messages(
    conn: psycopg.Connection,
    table: str,
    shape: str,
    *,
    count: int,
    seed: int,
    new_sessions_ratio: float = 0.3,
) -> int:
    """Append ``count`` messages stamped now(); return the rows added.

    ``round(count * new_sessions_ratio)`` rows go to brand-new sessions (about four
    messages each), the rest to sessions seen in the table's last few thousand rows,
    found by a backward primary-key scan so that a huge table costs no more.
    """
    _check_shape(shape)
    if count <= 0:
        return 0
    if not 0.0 <= new_sessions_ratio <= 1.0:
        raise ValueError("new_sessions_ratio must be between 0 and 1")
    ident = _table_identifier(table)
    with conn.transaction():
        row = conn.execute(
            query("demo_recent_sessions", table=ident), {"recent_rows": _RECENT_ROWS}
        ).fetchone()
        assert row is not None
        max_id, existing = int(row[0]), sorted(row[1])
        to_new = count if not existing else round(count * new_sessions_ratio)
        new_sessions = max(1, -(-to_new // _MESSAGES_PER_NEW_SESSION)) if to_new else 1
        insert_cols, select_cols = _columns(shape)
        # max(id) salts the new session ids, so two calls never share "new" sessions.
        new_key = sql.SQL(
            "'add:' || %(seed)s::text || ':' || %(salt)s::text || ':' || "
            "((g.i - 1) %% %(new_sessions)s)::text"
        )
        cast = sql.SQL("::uuid") if shape == "langchain" else sql.SQL("")
        statement = query(
            "demo_add_messages",
            table=ident,
            insert_cols=insert_cols,
            select_cols=select_cols,
            new_sid=_session_id(shape, new_key),
            pick=_hash("g.i", 10),
            cast=cast,
            content_hash=_hash("g.i", 11),
        )
        cur = conn.execute(
            statement,
            {
                "seed": seed,
                "mask": _MASK,
                "salt": max_id,
                "to_new": to_new,
                "new_sessions": new_sessions,
                "existing": existing,
                "n_existing": len(existing),
                "count": count,
                **_texts(),
            },
        )
        return cur.rowcount


# (crew_code, client_code, histories_table, shape, sessions)
_DEMO_USERS = 97  # users per client: the 97 in the messages' user_id
_DEMO_CREWS = (
    ("acme_support", "acme", "acme_support_histories", "n8n", 300),
    ("acme_sales", "acme", "acme_sales_histories", "langchain", 200),
    ("globex_helpdesk", "globex", "globex_helpdesk_histories", "n8n_created_at", 400),
    ("globex_onboarding", "globex", "globex_onboarding_histories", "n8n", 150),
    ("initech_billing", "initech", "demo.initech_billing_histories", "langchain", 250),
    ("initech_assistant", "initech", "initech_assistant_histories", "n8n_created_at", 300),
)


def create_product_tables(conn: psycopg.Connection) -> None:
    """The product's own tables that enrichment joins (the pipeline never creates
    them): one insights row per client and user, one ticket per conversation."""
    conn.execute(query("demo_create_product_tables"))


def fill_product_tables(conn: psycopg.Connection) -> tuple[int, int]:
    """Insights for most demo users (some have none) and a ticket for about one
    conversation in twelve of each crew; returns (users, tickets)."""
    create_product_tables(conn)
    users = conn.execute(
        query("demo_fill_user_insights"),
        {"users": _DEMO_USERS},
    ).rowcount
    tickets = 0
    for crew, client, table, _shape, _sessions in _DEMO_CREWS:
        tickets += conn.execute(
            query("demo_fill_linked_tickets", table=_table_identifier(table)),
            {"crew": crew, "client": client},
        ).rowcount
    return users, tickets


def load_demo(conn: psycopg.Connection, *, seed: int = 7) -> dict[str, int]:
    """Register six demo crews of three clients, fill their histories and the
    product's user insights and tickets, once.

    Does nothing (returns ``{}``) when the ``crews`` table already has rows, so the
    dev launcher may call it on every start. Expects a migrated database.
    """
    added: dict[str, int] = {}
    with conn.transaction():
        # Two launchers starting together: the second waits, then sees the crews.
        locks.transaction_lock(conn, "demo")
        row = conn.execute(query("demo_crews_exist")).fetchone()
        if row and row[0]:
            return {}
        conn.execute(query("demo_create_schema"))
        for number, (crew, client, table, shape, sessions) in enumerate(_DEMO_CREWS):
            create_histories_table(conn, table, shape)
            added[table] = fill_histories(
                conn, table, shape, sessions=sessions, seed=seed * 100 + number, malformed=4
            )
            conn.execute(
                query("demo_register_crew"),
                {"crew_code": crew, "client_code": client, "histories_table": table},
            )
        fill_product_tables(conn)
    return added
