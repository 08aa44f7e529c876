from resources.embeddings import EmbeddingResource
from resources.postgres import PostgresResource
from resources.summarizer import SummarizerResource

__all__ = ["EmbeddingResource", "PostgresResource", "SummarizerResource"]
