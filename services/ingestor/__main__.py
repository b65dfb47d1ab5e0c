"""The ingestor process: serves ``ingest`` (chunking, Token Governor, summaries; storage via ``memory``)."""

from __future__ import annotations

from batos.worker import run_service
from services.ingestor.handlers import HANDLERS

INGEST_CAPACITY = 2  # concurrent ingest runs per worker: each keeps a thread and memory busy


def main() -> None:
    run_service("ingest", handlers=HANDLERS, capacity=INGEST_CAPACITY)


if __name__ == "__main__":
    main()
