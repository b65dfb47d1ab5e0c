"""The protocol: see :mod:`proto.schema`, the single source of truth."""

from proto.schema import *  # noqa: F403
from proto.schema import __doc__ as _schema_doc  # noqa: F401
