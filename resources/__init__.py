from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource

__all__ = ["EmbeddingResource", "PostgresResource"]
