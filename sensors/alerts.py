"""The run-failure alert: each failed run of this code location, posted to a webhook."""

import dagster as dg

from conversation_assets import monitoring, settings


def build_alert_webhook_sensor() -> dg.SensorDefinition:
    """Posts each failed run to ALERT_WEBHOOK_URL. Without a URL it starts stopped:
    a sensor with nowhere to post would still read the event log every 30 s."""
    current = settings.load()
    running = current.enable_background_jobs and current.alert_webhook_url is not None

    @dg.run_failure_sensor(
        name="alert_webhook_sensor",
        default_status=dg.DefaultSensorStatus.RUNNING
        if running
        else dg.DefaultSensorStatus.STOPPED,
        description="Posts a Slack-compatible message to ALERT_WEBHOOK_URL when a run fails "
        "(starts stopped when the variable is unset).",
    )
    def alert_webhook_sensor(context: dg.RunFailureSensorContext) -> None:
        url = monitoring.webhook_url()
        if url:
            run = context.dagster_run
            monitoring.post_alert(
                url,
                monitoring.describe_failure(
                    "run",
                    run.job_name,
                    f"run {run.run_id}: {context.failure_event.message or 'no message'}",
                ),
            )

    return alert_webhook_sensor


alert_webhook_sensor = build_alert_webhook_sensor()
