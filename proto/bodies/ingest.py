"""The ``ingest`` service's bodies (services/ingestor)."""

from __future__ import annotations
