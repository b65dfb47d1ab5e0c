"""The typed bodies of every service's commands, one module per service (see :mod:`proto.contract`).

Importing this package registers them all; :func:`proto.contract.spec` does it on first use.
"""

from proto.bodies import broker, ingest, kernel, llm, memory, runtime, steward  # noqa: F401
