"""Every partition definition of the project."""

import dagster as dg

from conversation_assets import settings

# Sessions by the UTC day they started. end_offset=1 includes today, so sessions
# started today have a partition to land in.
_START = settings.load().discovery_partitions_start.isoformat()

daily_partitions = dg.DailyPartitionsDefinition(
    start_date=_START, end_offset=1, timezone="UTC"
)

# Pipeline figures by the UTC hour. end_offset=0: an hour is a partition once it is
# over, so the hourly schedule always refreshes a complete hour.
hourly_partitions = dg.HourlyPartitionsDefinition(
    start_date=f"{_START}-00:00", end_offset=0, timezone="UTC"
)
