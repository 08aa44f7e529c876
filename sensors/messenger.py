"""The Messenger sensors: partitions that mirror `messenger_pages`, and incremental
syncs of the pages that changed (one light probe each, at most one run per tick)."""

from datetime import timedelta
from typing import Any

import dagster as dg
import psycopg

from conversation_assets import settings
from conversation_assets.assets.messenger import (
    messenger_pages_partitions,
    partition_changes,
    sync_run_requests,
)
from conversation_assets.messenger import (
    database_now,
    load_pages,
    page_due_for_reconcile,
    probe_page,
)
from conversation_assets.messenger_api import GraphApiError, scrub
from conversation_assets.queries import query
from resources.messenger import MessengerResource, MessengerTokenError
from resources.postgres import PostgresResource
from sensors.common import ACTIVE, default_status, runs


def build_messenger_pages_sensor() -> dg.SensorDefinition:
    @dg.sensor(
        name="messenger_pages_sensor",
        minimum_interval_seconds=settings.load().messenger_sensor_interval_seconds,
        default_status=default_status(),
        description="Keeps the `messenger_pages` partitions in step with the messenger_pages "
        "table: a registered page gets its partition, a removed one loses it (its rows stay).",
    )
    def messenger_pages_sensor(
        context: dg.SensorEvaluationContext, postgres: PostgresResource
    ) -> dg.SensorResult | dg.SkipReason:
        with postgres.connection() as conn:
            registered = [row[0] for row in conn.execute(query("registered_messenger_pages"))]
        existing = context.instance.get_dynamic_partitions(messenger_pages_partitions.name)
        add, delete = partition_changes(registered, existing)
        if not add and not delete:
            return dg.SkipReason(f"{len(registered)} pages, each with its partition")
        requests: list[dg.AddDynamicPartitionsRequest | dg.DeleteDynamicPartitionsRequest] = []
        if add:
            requests.append(messenger_pages_partitions.build_add_request(add))
        if delete:
            requests.append(messenger_pages_partitions.build_delete_request(delete))
        return dg.SensorResult(dynamic_partitions_requests=requests)

    return messenger_pages_sensor


def build_messenger_sync_sensor(job: Any) -> dg.SensorDefinition:
    """`job`: messenger_sync_job (an unresolved asset job, typed loosely here)."""
    reconcile_hours = settings.load().messenger_reconcile_hours

    @dg.sensor(
        name="messenger_sync_sensor",
        job=job,
        minimum_interval_seconds=settings.load().messenger_sensor_interval_seconds,
        default_status=default_status(),
        description="Probes each enabled page with one light Graph API call and requests "
        "an incremental run for the pages with new or changed threads (or due for their "
        "periodic full sync), one per block of neighbouring partitions, so a run covers only "
        "pages it syncs; none while a sync runs or for a page told to wait.",
    )
    def messenger_sync_sensor(
        context: dg.SensorEvaluationContext,
        postgres: PostgresResource,
        messenger: MessengerResource,
    ) -> dg.SensorResult | dg.SkipReason:
        if runs(context, job, ACTIVE):
            return dg.SkipReason("a Messenger sync is under way")
        partitions = context.instance.get_dynamic_partitions(messenger_pages_partitions.name)
        try:
            found = messenger.load_tokens()
        except MessengerTokenError as error:
            return dg.SkipReason(str(error))
        tokens = found.tokens
        secrets = tuple(tokens.values())
        due: list[str] = []
        with postgres.connection() as conn:
            now = database_now(conn)
            for page in load_pages(conn):
                if not page.enabled or page.page_id not in partitions:
                    continue
                if page.throttled_until is not None and page.throttled_until > now:
                    continue
                if reconcile_hours and page_due_for_reconcile(
                    page, timedelta(hours=reconcile_hours), now
                ):
                    due.append(page.page_id)
                    continue
                token = tokens.get(page.page_id)
                if token is None:
                    context.log.warning(
                        found.unusable.get(page.page_id) or f"page {page.page_id}: no access token"
                    )
                    continue
                client = messenger.client(page.page_id, token)
                client.max_retries, client.max_throttle_wait = 1, 0.0  # a probe never waits
                try:
                    if probe_page(conn, client, page):
                        due.append(page.page_id)
                except (GraphApiError, psycopg.Error) as error:
                    # One page's trouble is that page's: the others are still probed.
                    context.log.warning(scrub(str(error), secrets))
        requests = sync_run_requests(due, list(partitions))
        if not requests:
            return dg.SkipReason("no page has changes to sync")
        return dg.SensorResult(run_requests=requests)

    return messenger_sync_sensor
