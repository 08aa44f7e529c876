from resources.postgres import PostgresResource

__all__ = ["PostgresResource"]
