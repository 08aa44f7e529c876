"""Every partition definition of the project, and the helpers that map days to keys."""

from datetime import UTC, date, datetime

import dagster as dg

from conversation_assets import settings

# Sessions by the UTC day they started. end_offset=1 includes today, so sessions
# started today have a partition to land in.
_START = settings.load().discovery_partitions_start.isoformat()

daily_partitions = dg.DailyPartitionsDefinition(start_date=_START, end_offset=1, timezone="UTC")

# Pipeline figures by the UTC hour. end_offset=0: an hour is a partition once it is
# over, so the hourly schedule always refreshes a complete hour.
hourly_partitions = dg.HourlyPartitionsDefinition(
    start_date=f"{_START}-00:00", end_offset=0, timezone="UTC"
)


def partition_keys_for(days: set[date]) -> list[str]:
    """Days that are partitions (sessions before the partitions' start have none)."""
    first = daily_partitions.start.date()
    last = datetime.now(UTC).date()
    return sorted(day.isoformat() for day in days if first <= day <= last)


def announce_other_partitions(
    context: dg.AssetExecutionContext, days: set[date], what: str, mode: str
) -> None:
    """An incremental run can change rows of other days than its own (a session that
    started yesterday got a new message): announce those partitions too, so what
    depends on them sees the change."""
    own = set(context.partition_keys)
    for key in partition_keys_for(days):
        if key not in own:
            context.log_event(
                dg.AssetMaterialization(
                    asset_key=context.asset_key,
                    partition=key,
                    description=f"{what} changed by run {context.run.run_id}",
                    metadata={"mode": mode},
                )
            )
