"""Ingestion with real processes: broker, runzeo, memory, ingest and the kernel (no forge: nothing here asks
the LLM), brought up once for the module; every call goes through the kernel as the console sends it.

What is asserted is what ``ingest`` promises: progress CHUNKING → INDEXING → COMPLETE to the requester only,
the reply's counts (binary and .gitignore'd files left out, a file that does not parse reported with its
error), chunks that memory finds at the file's real lines, incremental re-runs (unchanged / changed /
deleted), and a real package (the stdlib ``email``) ingested without errors.
"""

from __future__ import annotations

import ast
import asyncio
import email
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq.asyncio

import proto
from batos.client import Client
from proto import Kind
from services.ingestor.files import chunk_file
from tests.conftest import System

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

KERNEL_ENV = {
    "BATOS_AUTOTELIC_PERIOD": "3600",  # no background audit ingestion competing with the runs under test
    "BATOS_KERNEL_INSTANCE": "ingest-live-test",
}
SERVICES = {"kernel": 1, "memory": 1, "ingest": 1}

BILLING = '''"""Invoices and ledgers for a small bookshop."""

from decimal import Decimal

TAX_RATES = {"books": Decimal("0.00"), "stationery": Decimal("0.20"), "gifts": Decimal("0.20")}


def compute_invoice_total(lines, discount_code=None, currency="GBP"):
    """Sum an invoice's lines with per-category tax, then apply an optional discount code."""
    subtotal = Decimal("0")
    tax = Decimal("0")
    for line in lines:
        quantity = Decimal(str(line["quantity"]))
        unit_price = Decimal(str(line["unit_price"]))
        amount = quantity * unit_price
        subtotal += amount
        tax += amount * TAX_RATES.get(line.get("category", "books"), Decimal("0.20"))
    if discount_code == "READER10":
        subtotal = subtotal * Decimal("0.90")
    elif discount_code == "STAFF25":
        subtotal = subtotal * Decimal("0.75")
    if subtotal < 0:
        raise ValueError(f"invoice subtotal is negative: {subtotal}")
    total = (subtotal + tax).quantize(Decimal("0.01"))
    return {"currency": currency, "subtotal": str(subtotal), "tax": str(tax), "total": str(total)}


class LedgerAccount:
    """A running balance with an audit trail of postings."""

    def __init__(self, owner, opening_balance=Decimal("0")):
        self.owner = owner
        self.balance = Decimal(opening_balance)
        self.postings = []

    def post(self, amount, memo=""):
        """Record a posting and move the balance."""
        amount = Decimal(str(amount))
        self.postings.append({"amount": amount, "memo": memo, "balance_before": self.balance})
        self.balance += amount
        return self.balance

    def reverse_last_posting(self):
        """Undo the most recent posting, if there is one."""
        if not self.postings:
            raise ValueError(f"{self.owner}: nothing to reverse")
        last = self.postings.pop()
        self.balance = last["balance_before"]
        return last
'''
SHAPES = '''"""Plane figures."""


def perimeter_of_hexagon_fence(side_length):
    """Metres of fencing around a regular hexagonal garden bed."""
    return 6 * side_length
'''
INVENTORY = '''"""Stock keeping."""


def restock_shelf(stock, item, count):
    """Add count units of item to the stock mapping."""
    stock[item] = stock.get(item, 0) + count
    return stock
'''
INVENTORY_V2 = '''"""Stock keeping."""


def restock_shelf(stock, item, count):
    """Add count units of item to the stock mapping."""
    stock[item] = stock.get(item, 0) + count
    return stock


def write_off_damaged_stock(stock, item, count):
    """Remove damaged units from the stock mapping, never below zero."""
    stock[item] = max(0, stock.get(item, 0) - count)
    return stock
'''
BROKEN = '''def half_written(x:
    return x +
'''
README = "# Bookshop\n\nTools for invoices, ledgers and stock.\n\n## Usage\n\nImport `billing` and call it.\n"
SECRET = 'def leaked_api_token():\n    return "do-not-ingest-me"\n'
INGESTED = ("billing.py", "shapes.py", "inventory.py", "broken.py", "README.md")


@dataclass
class Live:
    system: System
    root: Path
    tree: Path
    timings: dict[str, float]

    def client(self) -> Client:
        return Client(self.system.settings, identity=f"ingest-live-{uuid.uuid4().hex[:8]}")


class Stream:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def progress(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == "progress"]


async def kernel_ingest(client: Client, path: Path | str, timeout: float = 240) -> tuple[dict[str, Any], Stream]:
    stream = Stream()
    reply = await client.call("kernel", "ingest", {"path": str(path)}, on_event=stream, timeout=timeout)
    return reply, stream


async def kernel_search(client: Client, text: str, k: int = 8, **kw: Any) -> list[dict[str, Any]]:
    reply = await client.call("kernel", "search", {"text": text, "k": k, **kw}, timeout=120)
    return reply["hits"]


def stages(events: list[dict[str, Any]]) -> list[str]:
    """The progress stages in order, repeats collapsed."""
    out: list[str] = []
    for e in events:
        if not out or out[-1] != e["stage"]:
            out.append(e["stage"])
    return out


def def_lines(text: str, name: str) -> tuple[int, int]:
    node = next(n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.FunctionDef) and n.name == name)
    assert node.end_lineno is not None
    return node.lineno, node.end_lineno


def write_tree(tree: Path) -> None:
    tree.mkdir(parents=True)
    for name, text in (("billing.py", BILLING), ("shapes.py", SHAPES), ("inventory.py", INVENTORY),
                       ("broken.py", BROKEN), ("README.md", README), ("secret_keys.py", SECRET)):
        (tree / name).write_text(text)
    (tree / ".gitignore").write_text("secret_*.py\n")
    (tree / "notes.txt").write_bytes(b"looks like text\0\x01\x02 but holds NUL bytes\n")  # binary by content
    (tree / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))  # not an ingested type


async def _bring_up(system: System) -> float:
    async with Client(system.settings, identity="ingest-live-setup") as client:
        await client.wait_for_broker(20)
        started = time.monotonic()
        await system.wait_registered(client, SERVICES, timeout=240)
        return time.monotonic() - started


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("ingest_live")
    tree = root / "shop"
    write_tree(tree)
    system = System(root)
    try:
        system.start_broker()
        system.start_zeo()
        system.start_service("memory")
        # ingest reads only under its roots: the test tree and the stdlib package ingested below
        system.start_service("ingest", BATOS_INGEST_ROOTS=os.pathsep.join([str(root), os.path.dirname(email.__file__)]))
        system.start_service("kernel", **KERNEL_ENV)
        up = asyncio.run(_bring_up(system))
        yield Live(system, root, tree, {"startup_s": round(up, 1)})
    finally:
        system.stop_all()


# -- 1. a small tree through the kernel ------------------------------------------------------------------------


async def test_ingest_small_tree_progress_counts_and_exact_lines(live):
    tree = live.tree
    budget = live.system.settings.max_chunk_tokens
    expected_chunks = sum(len(chunk_file(str(tree / n), budget, 10**7).result.chunks) for n in INGESTED)
    async with live.client() as client:
        reply, stream = await kernel_ingest(client, tree)
        live.timings["first_ingest_s"] = reply["seconds"]

        # progress: to this requester, CHUNKING → INDEXING → COMPLETE, with file counts
        progress = stream.progress()
        assert {e["event"] for e in stream.events} == {"progress"}, stream.events
        assert stages(progress) == ["CHUNKING", "INDEXING", "COMPLETE"], progress
        candidates = len(INGESTED) + 1  # + notes.txt (skipped as binary); logo.png/.gitignore/secret never count
        assert {e["files_total"] for e in progress} == {candidates}
        for stage in ("CHUNKING", "INDEXING"):
            done = [e["files_done"] for e in progress if e["stage"] == stage]
            assert done == sorted(done) and 0 < done[-1] <= candidates
        assert progress[-1]["files_done"] == progress[-1]["files_total"]
        assert progress[-1]["chunks"] == reply["chunks"]

        # the reply's counts
        assert reply["root"] == str(tree.resolve())
        assert reply["files"] == len(INGESTED) and reply["unchanged"] == 0 and reply["removed"] == 0
        assert reply["chunks"] == expected_chunks
        assert reply["skipped"] == 1 and reply["skipped_by_reason"] == {"binary": 1}
        assert reply["unsupported"] == 2  # logo.png, .gitignore
        [err] = reply["errors"]
        assert err["file_path"] == str(tree / "broken.py") and "SyntaxError" in err["error"], err

        # what memory holds: exactly the ingestible files, the ignored one never read
        hashes = (await client.call("memory", "file_hashes", {"root": str(tree)}))["hashes"]
        assert set(hashes) == {str(tree / n) for n in INGESTED}
        assert not await kernel_search(client, "leaked api token do not ingest", k=5,
                                       filters={"file_path": str(tree / "secret_keys.py")})

        # search through the kernel finds the function, at its real lines in the file
        hits = await kernel_search(client, "compute the invoice total with tax and a discount code", k=5)
        fn = [h for h in hits if h["metadata"].get("node_name") == "compute_invoice_total"]
        assert fn, [(h["level"], h["metadata"].get("node_name")) for h in hits]
        meta = fn[0]["metadata"]
        start, end = def_lines(BILLING, "compute_invoice_total")
        assert (meta["file_path"], meta["start_line"], meta["end_line"]) == (str(tree / "billing.py"), start, end)
        lines = (tree / "billing.py").read_text().splitlines(keepends=True)
        assert fn[0]["text"].rstrip("\n") == "".join(lines[start - 1:end]).rstrip("\n")

        # a method of the class is in memory too, inside the class's lines
        hits = await kernel_search(client, "undo the most recent ledger posting", k=5,
                                   filters={"file_path": str(tree / "billing.py")})
        assert any("def reverse_last_posting" in h["text"] for h in hits), hits


# -- 2. incremental ---------------------------------------------------------------------------------------------


async def test_reingest_unchanged_then_changed_and_deleted(live):
    tree = live.tree
    async with live.client() as client:
        first = live.timings.get("first_ingest_s")
        if first is None:  # run alone: make the first ingestion here
            first = (await kernel_ingest(client, tree))[0]["seconds"]

        again, stream = await kernel_ingest(client, tree)
        live.timings["unchanged_ingest_s"] = again["seconds"]
        assert again["unchanged"] == len(INGESTED) and again["files"] == 0 and again["chunks"] == 0, again
        assert again["removed"] == 0 and again["errors"] == []  # an unchanged broken file is not re-read
        assert again["seconds"] < first / 2, (again["seconds"], first)
        assert stream.progress()[-1]["stage"] == "COMPLETE"

        before = await kernel_search(client, "metres of fencing around a hexagonal garden bed", k=5)
        assert any(h["metadata"].get("file_path") == str(tree / "shapes.py") for h in before)

        (tree / "inventory.py").write_text(INVENTORY_V2)
        (tree / "shapes.py").unlink()
        changed, _ = await kernel_ingest(client, tree)
        assert changed["files"] == 1 and changed["removed"] == 1, changed
        assert changed["unchanged"] == len(INGESTED) - 2

        after = await kernel_search(client, "metres of fencing around a hexagonal garden bed", k=8)
        assert not any(h["metadata"].get("file_path") == str(tree / "shapes.py") for h in after), after
        assert not any("perimeter_of_hexagon_fence" in (h["text"] or "") for h in after)
        hashes = (await client.call("memory", "file_hashes", {"root": str(tree)}))["hashes"]
        assert str(tree / "shapes.py") not in hashes

        hits = await kernel_search(client, "remove damaged units from stock", k=5,
                                   filters={"file_path": str(tree / "inventory.py")})
        # small neighbours merge into one chunk: the new function is inside one, at the file's real lines
        new = [h for h in hits if h["level"] == "chunk" and "def write_off_damaged_stock" in h["text"]]
        assert new, hits
        start, end = new[0]["metadata"]["start_line"], new[0]["metadata"]["end_line"]
        fn_start, fn_end = def_lines(INVENTORY_V2, "write_off_damaged_stock")
        assert start <= fn_start <= fn_end <= end
        lines = INVENTORY_V2.splitlines(keepends=True)
        assert new[0]["text"].rstrip("\n") == "".join(lines[start - 1:end]).rstrip("\n")


# -- 3. a real package ------------------------------------------------------------------------------------------


@pytest.mark.timeout(480)  # ~60-80 s on two loaded cores; room for a busier machine
async def test_stdlib_email_package(live):
    package = os.path.dirname(email.__file__)
    async with live.client() as client:
        started = time.monotonic()
        reply, stream = await kernel_ingest(client, package, timeout=450)
        wall = time.monotonic() - started
    assert reply["errors"] == [], reply["errors"]
    assert reply["chunks"] > 100 and reply["files"] > 20, reply
    progress = stream.progress()
    assert progress[0]["stage"] == "CHUNKING" and progress[-1]["stage"] == "COMPLETE"
    assert "INDEXING" in stages(progress)
    rate = reply["chunks"] / wall
    live.timings["email_s"] = round(wall, 1)
    print(f"\nemail: {reply['files']} files, {reply['chunks']} chunks, {reply['summaries']} summaries in "
          f"{wall:.1f} s (service {reply['seconds']} s): {rate:.1f} chunks/s; {len(progress)} progress events")


# -- 4. progress goes to the requester only ---------------------------------------------------------------------


def recording_context(seen: list[proto.Envelope]) -> zmq.asyncio.Context:
    """A context whose sockets keep every envelope they receive (a Client drops ones it did not ask for)."""

    class RecordingSocket(zmq.asyncio.Socket):
        async def recv_multipart(self, *a: Any, **kw: Any) -> list[bytes]:
            frames = await super().recv_multipart(*a, **kw)
            seen.append(proto.decode(frames[-1]))
            return frames

    class RecordingContext(zmq.asyncio.Context):
        _socket_class = RecordingSocket

    return RecordingContext()


async def test_progress_reaches_only_the_requester(live):
    tree = live.root / "json_copy"  # fresh paths: a real ingestion, not an unchanged re-run
    shutil.copytree(os.path.dirname(__import__("json").__file__), tree, ignore=shutil.ignore_patterns("__pycache__"))
    seen: list[proto.Envelope] = []
    ctx = recording_context(seen)
    bystander = Client(live.system.settings, identity=f"ingest-live-bystander-{uuid.uuid4().hex[:8]}", ctx=ctx)
    async with live.client() as requester, bystander:
        await bystander.wait_for_broker(10)
        ingest = asyncio.create_task(kernel_ingest(requester, tree))
        own_ids: set[str] = set()
        bystander_events: list[dict[str, Any]] = []
        while not ingest.done():  # the bystander keeps talking to the same kernel meanwhile
            call = await bystander.start_call("kernel", "status", {})
            own_ids.add(call.id)
            await call.result(on_event=bystander_events.append)
            await asyncio.sleep(0.2)
        reply, stream = await ingest
        await asyncio.sleep(0.5)  # anything misrouted would have arrived by now

    assert reply["files"] >= 4 and reply["errors"] == [], reply
    assert len(stream.progress()) >= 3 and stream.progress()[-1]["stage"] == "COMPLETE"
    assert bystander_events == []
    ctx.term()
    assert any(e.kind == Kind.REPLY and e.corr in own_ids for e in seen)  # the recording does see its replies
    strays = [(e.kind, e.corr, e.body) for e in seen if e.kind == Kind.EVENT or
              (e.corr not in own_ids and e.service != proto.Service.BROKER)]
    assert strays == [], strays
    print(f"\ntimings: {live.timings}")


# -- 5. only under the ingest roots (issue 13 item 8) -----------------------------------------------------------


async def test_outside_the_roots_is_refused_and_planted_symlinks_are_reported(live, tmp_path_factory):
    from batos.errors import ServiceError

    outside = tmp_path_factory.mktemp("ingest_outside")  # not under the ingestor's roots
    (outside / "vault.py").write_text('def vault_secret():\n    return "root-only-vault-token"\n')
    tree = live.root / "planted"
    tree.mkdir()
    (tree / "ok.py").write_text("def harmless():\n    return 1\n")
    (tree / "vault.py").symlink_to(outside / "vault.py")  # planted by another user
    (tree / "vaultdir").symlink_to(outside)
    os.mkfifo(tree / "pipe.py")  # would block a plain open()
    async with live.client() as client:
        for path in ("/etc", "~root", outside / "vault.py", tree / "vault.py", tree / "pipe.py"):
            with pytest.raises(ServiceError) as e:
                await kernel_ingest(client, path, timeout=60)
            assert e.value.code == proto.ErrorCode.BAD_ARGS and "ingest refused" in e.value.message, e.value
        reply, _ = await kernel_ingest(client, tree)
        hits = await kernel_search(client, "vault secret root only vault token", k=8)
    assert reply["files"] == 1, reply
    refused = {Path(r["file_path"]).name: r["reason"] for r in reply["refused"]}
    assert set(refused) == {"vault.py", "vaultdir", "pipe.py"}, refused
    assert "fifo" in refused["pipe.py"] and str(outside) in refused["vault.py"]
    assert not any("root-only-vault-token" in str(h) for h in hits)
