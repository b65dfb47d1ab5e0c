"""The memory service's whitelist: every contract command is wired to the weaver."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from batos.config import load
from batos.errors import ServiceError
from proto.bodies.memory import Stats
from services.memory_weaver.handlers import HANDLERS
from services.memory_weaver.weaver import MemoryWeaver
from tests.unit.memory_wire import Wire
from tests.unit.test_memory_image import image, settings, zeo_addr  # noqa: F401  (fixtures)
from tests.unit.test_memory_weaver import WordEmbedder, file_payload

CONTRACT = {"replace_files", "file_hashes", "delete_file", "search", "inspect", "stats", "create_fractals",
            "audit_offset", "query_fractals", "verify"}


def request(state, command, args):
    return SimpleNamespace(command=command, args=args, ctx=SimpleNamespace(state=state, settings=load()),
                           cancelled=threading.Event())


def test_every_contract_command_has_a_handler():
    assert CONTRACT == set(HANDLERS)  # and nothing else: a command no production code calls is deleted


async def test_handlers_reach_the_weaver(image):  # noqa: F811
    w = MemoryWeaver(image, WordEmbedder(), shard_rows=8)
    await w.start()
    r = (await Wire(w).replace_files({"files": [file_payload("/a.py")]}))["files"][0]
    got = await Wire(w).inspect({"oid": r["oids"][1]})
    assert got["prototype"] == "memory_chunk"
    hits = await Wire(w).search({"text": "alpha", "k": 2})
    assert hits["hits"]
    await w.close()


async def test_unstarted_service_is_unavailable():
    with pytest.raises(ServiceError) as ei:
        await HANDLERS["stats"](request({}, "stats", {}), Stats())
    assert ei.value.code == "unavailable"
