"""One query's way through the node: plan -> route -> execute on an Expert (with failover) -> record."""

from node.pipeline.query import Answer, PartServed, Query, served
from node.pipeline.run import QueryPipeline

__all__ = ["Answer", "PartServed", "Query", "QueryPipeline", "served"]
