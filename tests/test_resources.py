"""The PostgreSQL resource: pool settings reach the server, pgvector is registered."""

import numpy as np

from resources.postgres import PostgresResource


def test_pool_connections_carry_the_configured_settings_and_pgvector(db_url):
    resource = PostgresResource(
        database_url=db_url,
        pool_min_size=1,
        pool_max_size=3,
        statement_timeout_ms=1234,
        idle_in_transaction_timeout_ms=5678,
        application_name="cp-resource-test",
    )
    try:
        with resource.connection() as conn:
            settings = conn.execute(
                "SELECT current_setting('statement_timeout'), "
                "current_setting('idle_in_transaction_session_timeout'), "
                "current_setting('application_name')"
            ).fetchone()
            vector = conn.execute("SELECT %s::vector", (np.array([1.5, 2.0, 3.0]),)).fetchone()[0]
            assert conn.autocommit  # every transaction in the project is an explicit block
        assert settings == ("1234ms", "5678ms", "cp-resource-test")
        assert vector.to_list() == [1.5, 2.0, 3.0]  # adapted both ways by pgvector
        stats = resource.pool_stats()
        assert stats["pool_max"] == 3 and stats["pool_size"] >= 1
    finally:
        resource.close()
