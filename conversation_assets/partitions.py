"""Every partition definition of the project."""

import dagster as dg

from conversation_assets import settings

# Sessions by the UTC day they started. end_offset=1 includes today, so sessions
# started today have a partition to land in.
daily_partitions = dg.DailyPartitionsDefinition(
    start_date=settings.partitions_start(), end_offset=1, timezone="UTC"
)
