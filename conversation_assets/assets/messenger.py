"""The Messenger assets: each registered page's threads and messages, and the threads
as conversations. Partitioned by page (dynamic partitions mirroring
`messenger_pages`), so the UI syncs or backfills one page, some, or all."""

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import dagster as dg
from pydantic import Field

from conversation_assets import settings
from conversation_assets.messenger import (
    BuildReport,
    PageOutcome,
    SyncOptions,
    build_thread_conversations,
    database_now,
    load_pages,
    page_due_for_reconcile,
    sync_page,
)
from conversation_assets.messenger_api import scrub
from conversation_assets.runs import record_pipeline_run
from resources.messenger import MessengerResource, MessengerTokenError
from resources.postgres import PostgresResource

messenger_pages_partitions = dg.DynamicPartitionsDefinition(name="messenger_pages")

THREADS = dg.AssetKey("messenger_conversations")
EVENTS = dg.AssetKey("contact_interaction_events")

warnings.filterwarnings("ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning)


class MessengerSyncConfig(dg.Config):
    mode: Literal["incremental", "full"] = Field(
        default="full",
        description="full: list every thread and message of the page and mark what the "
        "platform no longer has as deleted (what a launched partition or a backfill wants). "
        "incremental: only threads updated since the watermark minus the overlap (what the "
        "sensor launches).",
    )
    pages: list[str] = Field(
        default_factory=list,
        description="Only these pages of the run's partitions (all of them if empty); the "
        "others are not synced, and the run fails naming them (none is marked materialized).",
    )
    overlap_seconds: int = Field(
        default_factory=lambda: settings.load().messenger_overlap_seconds,
        ge=0,
        description="Incremental listing goes down to the watermark minus this "
        "(MESSENGER_OVERLAP_SECONDS).",
    )
    reconcile_hours: int = Field(
        default_factory=lambda: settings.load().messenger_reconcile_hours,
        ge=0,
        description="An incremental sync of a page not fully synced for this long runs "
        "full (MESSENGER_RECONCILE_HOURS); 0: never.",
    )
    page_size: int = Field(default=100, ge=1, le=100, description="Threads per API call.")
    page_concurrency: int = Field(
        default_factory=lambda: settings.load().messenger_page_concurrency,
        ge=1,
        le=32,
        description="Pages synced at once (MESSENGER_PAGE_CONCURRENCY).",
    )
    nested_messages: int = Field(
        default=25,
        ge=1,
        le=100,
        description="Newest messages asked for with each thread (`messages.limit(N)`); a "
        "changed thread with more new messages costs one more call per 100.",
    )


def _page_metadata(outcome: PageOutcome) -> dict[str, Any]:
    keep = (
        "mode", "status", "error", "threads_listed", "threads_new", "threads_updated",
        "threads_deleted", "messages_new", "messages_updated", "messages_deleted", "rejects",
        "calls", "list_calls", "message_calls", "node_calls", "retries", "throttle_waits",
        "throttle_seconds", "slowdown_waits", "slowdown_seconds", "usage_percent",
        "watermark_before", "watermark_after", "resume_after", "seconds", "api_seconds",
        "db_seconds",
    )  # fmt: skip
    values = outcome.metadata()
    return {key: values[key] for key in keep}


def _flat(outcome: PageOutcome) -> dict[str, Any]:
    data = _page_metadata(outcome)
    return {
        key: ("" if value is None else value)
        for key, value in data.items()
        if key not in ("error", "resume_after") or value is not None
    }


def _totals(outcomes: list[PageOutcome]) -> dict[str, Any]:
    fields = (
        "threads_new", "threads_updated", "threads_deleted", "messages_new",
        "messages_updated", "messages_deleted", "rejects", "calls", "throttle_waits",
    )  # fmt: skip
    totals: dict[str, Any] = {f: sum(getattr(o, f) for o in outcomes) for f in fields}
    totals["throttle_seconds"] = round(sum(o.throttle_seconds for o in outcomes), 3)
    return totals


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            THREADS,
            description="One row per (page, contact): the Messenger thread, its participant, "
            "updated_time, message and unread counts, snippet, first and last message.",
            kinds={"postgres"},
            group_name="messenger",
        ),
        dg.AssetSpec(
            EVENTS,
            description="One row per Messenger message (idempotent on its id): direction, "
            "sender, time, text or attachment kind.",
            kinds={"postgres"},
            group_name="messenger",
        ),
    ],
    partitions_def=messenger_pages_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="messenger_graph_api",
)
def messenger_sync(
    context: dg.AssetExecutionContext,
    config: MessengerSyncConfig,
    postgres: PostgresResource,
    messenger: MessengerResource,
) -> Any:
    """Sync each page of the run: incremental from the watermark, or full (reconcile).

    A page that fails (an invalid token, a throttle longer than a run waits) does not
    stop the others; its progress is kept and the run fails at the end naming it."""
    started = time.perf_counter()
    keys = list(context.partition_keys)
    wanted = [k for k in keys if not config.pages or k in config.pages]
    left_out = [k for k in keys if k not in wanted]
    try:
        found = messenger.load_tokens()
    except MessengerTokenError as error:
        raise dg.Failure(description=str(error)) from None
    tokens = found.tokens
    with postgres.connection() as conn:
        pages = {p.page_id: p for p in load_pages(conn, wanted)}
        now = database_now(conn)
    secrets = tuple(tokens.values()) + ((messenger.app_secret,) if messenger.app_secret else ())

    def say(message: str) -> None:
        context.log.info(scrub(message, secrets))

    def sync_one(page_id: str) -> PageOutcome:
        page = pages.get(page_id)
        if page is None:
            return _skipped(page_id, f"page {page_id}: not in messenger_pages")
        if not page.enabled:
            return _skipped(
                page_id, f"page {page_id}: disabled in messenger_pages", page.client_code
            )
        token = tokens.get(page_id)
        if token is None:
            message = found.unusable.get(page_id) or (
                f"page {page_id}: no access token (add it to MESSENGER_PAGE_TOKENS or "
                "MESSENGER_PAGE_TOKENS_FILE)"
            )
            context.log.error(message)
            return _skipped(page_id, message, page.client_code, status="failed")
        mode = config.mode
        reconcile = timedelta(hours=config.reconcile_hours)
        if (
            mode == "incremental"
            and config.reconcile_hours
            and page_due_for_reconcile(page, reconcile, now)
        ):
            say(f"page {page_id}: not fully synced for {reconcile}: full sync")
            mode = "full"
        options = SyncOptions(
            mode=mode,
            overlap=timedelta(seconds=config.overlap_seconds),
            page_size=config.page_size,
            nested_messages=config.nested_messages,
        )
        client = messenger.client(page_id, token, say=say)
        outcome = sync_page(postgres.pool, client, page, options, say)
        if outcome.status != "ok":
            context.log.error(outcome.error or f"page {page_id}: {outcome.status}")
        return outcome

    # Pages side by side: each waits on the API most of the time. More pages than the
    # pool's connections serve would wait on each other until one times out. Outcomes
    # keep the partitions' order.
    per_page = SyncOptions().connections
    fits = max(1, postgres.pool.max_size // per_page)
    side = min(config.page_concurrency, len(wanted) or 1)
    if side > fits:
        context.log.warning(
            f"{side} pages at once would need {side * per_page} database "
            f"connections; the pool has {postgres.pool.max_size} (PG_POOL_MAX_SIZE): "
            f"syncing {fits} at once"
        )
        side = fits
    with ThreadPoolExecutor(
        max_workers=side,
        thread_name_prefix="messenger-page",
    ) as side_by_side:
        outcomes: list[PageOutcome] = list(side_by_side.map(sync_one, wanted))
    # A partition of the run not synced (failed, throttled, skipped, or left out by
    # `pages`) must not show as materialized: the synced ones are recorded one by one
    # and the run fails naming the others.
    failed = [o for o in outcomes if o.status != "ok"] + [
        _skipped(k, f"page {k}: not among the run's `pages`") for k in left_out
    ]
    done = [o for o in outcomes if o.status == "ok"]
    metadata: dict[str, Any] = {
        **_totals(outcomes),
        "pages": dg.MetadataValue.json({o.page_id: _page_metadata(o) for o in outcomes}),
        "pages_synced": len(done),
        "pages_failed": len(failed),
    }
    if len(outcomes) == 1:
        metadata.update(_flat(outcomes[0]))
    if failed:
        # The pages that succeeded are recorded; the run fails naming the others.
        for outcome in done:
            for key in (THREADS, EVENTS):
                yield dg.AssetMaterialization(
                    asset_key=key, partition=outcome.page_id, metadata=_flat(outcome)
                )
        raise dg.Failure(
            description="; ".join(o.error or f"page {o.page_id}: {o.status}" for o in failed),
            metadata={"pages": metadata["pages"]},
        )
    record_pipeline_run(
        postgres.pool,
        run_id=context.run.run_id,
        asset=THREADS.to_user_string(),
        partition_key=keys[0] if len(keys) == 1 else None,
        duration_ms=(time.perf_counter() - started) * 1000,
        items=sum(o.threads_new + o.threads_updated for o in outcomes),
        batches=sum(o.api_pages for o in outcomes),
    )
    for key in (THREADS, EVENTS):
        yield dg.MaterializeResult(asset_key=key, metadata=metadata)


def _skipped(page_id: str, why: str, client_code: str = "", status: str = "skipped") -> PageOutcome:
    return PageOutcome(
        page_id=page_id, client_code=client_code, mode="incremental", status=status, error=why
    )


class MessengerTranscriptsConfig(dg.Config):
    mode: Literal["incremental", "full"] = Field(
        default="full",
        description="incremental: the threads the sync queued. full: every thread of the "
        "partition's pages.",
    )
    batch_threads: int = Field(default=500, ge=1, description="Threads per transaction.")


@dg.asset(
    deps=[THREADS, EVENTS],
    partitions_def=messenger_pages_partitions,
    backfill_policy=dg.BackfillPolicy.single_run(),
    pool="conversation_db",
    kinds={"postgres"},
    group_name="messenger",
)
def messenger_transcripts(
    context: dg.AssetExecutionContext,
    config: MessengerTranscriptsConfig,
    postgres: PostgresResource,
) -> dg.MaterializeResult:
    """Each synced thread as a row of `conversations` (channel `messenger`, the contact as
    user), through the write path of discovered sessions: transcript, summary, metadata,
    then embeddings, enrichment and metrics like any chat session."""
    report: BuildReport = build_thread_conversations(
        postgres.pool,
        list(context.partition_keys),
        mode=config.mode,
        batch_threads=config.batch_threads,
        say=context.log.info,
    )
    written = report.written
    keys = list(context.partition_keys)
    record_pipeline_run(
        postgres.pool,
        run_id=context.run.run_id,
        asset="messenger_transcripts",
        partition_key=keys[0] if len(keys) == 1 else None,
        duration_ms=report.seconds * 1000,
        items=report.threads,
        batches=report.batches,
    )
    return dg.MaterializeResult(
        metadata={
            "mode": config.mode,
            "threads": report.threads,
            "inserted": written.inserted,
            "updated": written.updated,
            "unchanged": written.unchanged,
            "rejected": written.rejected,
            "soft_deleted": report.soft_deleted,
            "batches": report.batches,
            "queue_left": report.queue_left,
            "duration_ms": round(report.seconds * 1000, 1),
        }
    )


def partition_changes(registered: list[str], existing: list[str]) -> tuple[list[str], list[str]]:
    """Partitions to add and to delete so that they mirror the registered pages."""
    known = set(existing)
    pages = set(registered)
    return [p for p in registered if p not in known], [p for p in existing if p not in pages]


def sync_run_requests(
    due: list[str], partition_order: list[str], *, now: datetime | None = None
) -> list[dg.RunRequest]:
    """One run per block of due pages that are neighbours in the partitions' order: a
    run's range holds only pages it syncs, so every partition it marks materialized
    was synced (a page between two due ones may be throttled or lack its token)."""
    wanted = set(due)
    blocks: list[list[str]] = []
    previous_due = False
    for page_id in partition_order:
        if page_id in wanted:
            if not previous_due:
                blocks.append([])
            blocks[-1].append(page_id)
        previous_due = page_id in wanted
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")
    return [
        dg.RunRequest(
            run_key=f"messenger:{stamp}:{block[0]}..{block[-1]}",
            run_config=dg.RunConfig(
                ops={
                    "messenger_sync": MessengerSyncConfig(mode="incremental"),
                    "messenger_transcripts": MessengerTranscriptsConfig(mode="incremental"),
                }
            ),
            tags={
                "dagster/asset_partition_range_start": block[0],
                "dagster/asset_partition_range_end": block[-1],
                "messenger/pages": str(len(block)),
            },
        )
        for block in blocks
    ]
