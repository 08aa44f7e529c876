"""A snapshot of what Dagster loads: a rename or a lost definition fails here first.

After an intended change, regenerate it and review the diff:
``UPDATE_DEFINITIONS_SNAPSHOT=1 scripts/test tests/test_definitions.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

SNAPSHOT = Path(__file__).with_name("definitions_snapshot.json")


def _describe(defs: dg.Definitions) -> dict[str, Any]:
    graph = defs.resolve_asset_graph()
    jobs = {}
    for job in defs.resolve_all_job_defs():
        if job.name.startswith("__"):  # Dagster's implicit asset job
            continue
        partitions = job.partitions_def
        jobs[job.name] = type(partitions).__name__ if partitions else None
    return {
        "assets": sorted(key.to_user_string() for key in graph.get_all_asset_keys()),
        "asset_checks": sorted(
            f"{key.asset_key.to_user_string()}:{key.name}" for key in graph.asset_check_keys
        ),
        "jobs": jobs,
        "schedules": {
            schedule.name: [schedule.cron_schedule, schedule.job_name]
            for schedule in map(defs.resolve_schedule_def, (s.name for s in defs.schedules or []))
        },
        "sensors": sorted(s.name for s in defs.sensors or []),
        "resources": sorted(defs.resources or {}),
    }


def test_the_loaded_definitions_match_the_snapshot() -> None:
    from conversation_assets.definitions import defs

    current = _describe(defs)
    if os.environ.get("UPDATE_DEFINITIONS_SNAPSHOT"):
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())
