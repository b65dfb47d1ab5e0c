"""The openai backend against a real OpenAI-compatible server: llama-cpp-python's, on the packaged SmolLM2 GGUF.

The server runs in its own process on a socket this test bound (tests/integration/llama_server.py), so
the port is never raced for. Covered: streamed generation, stop strings, the constrained action (the
server takes a schema only in its own ``json_object`` form: the backend falls back to it), cancellation
mid-stream, the same through the llm service (a forge worker with ``BATOS_LLM_BACKEND=openai``), and the
kernel's own cycles over it: an `ask` (streamed answer, grounded or the stated degraded reply) and a `send`
whose method BRICK writes through the server (persisted only if it ran, else a clear refusal).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from batos import models, personas
from batos.errors import ServiceError
from proto.react import ACTIONS
from services.forge.backends.base import CANCELLED, LENGTH, GenerationParams
from services.forge.backends.openai_compat import OpenAICompatBackend
from services.forge.structured import run_action
from tests.conftest import _die_with_parent

pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python (with its server extras) is not installed")

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALIAS = "smollm2-served"
HELPER = Path(__file__).with_name("llama_server.py")
MESSAGES = [{"role": "user", "content": "Say hello to the Architect."}]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory) -> Iterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(HELPER), str(sock.fileno()), str(models.embedded_gguf_path()), ALIAS],
            pass_fds=[sock.fileno()], stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )  # fmt: skip
    sock.close()  # the server holds it now; if it dies, connecting fails at once instead of hanging
    url = f"http://127.0.0.1:{port}/v1"
    try:
        # the connection waits in the listen backlog until the server has loaded the model and answers
        with urllib.request.urlopen(f"{url}/models", timeout=120) as resp:
            assert json.load(resp)["data"][0]["id"] == ALIAS
        yield url
    except Exception:
        raise RuntimeError(f"llama_cpp server did not come up:\n{log.read_text(errors='replace')[-3000:]}") from None
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def backend(server_url) -> OpenAICompatBackend:
    return OpenAICompatBackend(server_url, ALIAS)


def chat(persona: str, text: str) -> list[dict[str, str]]:
    return personas.with_system_prompt(persona, [{"role": "user", "content": text}])


def test_streamed_generation_with_usage_and_stop_strings(backend):
    tokens: list[str] = []
    result = backend.generate("ROBIN", chat("ROBIN", "What is a persistent object?"), GenerationParams(max_tokens=12),
                              tokens.append)  # fmt: skip
    assert result.text and "".join(tokens) == result.text and len(tokens) > 1  # it streamed
    assert result.completion_tokens == 12 and result.finish_reason == LENGTH
    assert result.prompt_tokens > 20 and result.model == ALIAS
    stop = result.text[6:10]
    cut = backend.generate("ROBIN", chat("ROBIN", "What is a persistent object?"),
                           GenerationParams(max_tokens=12, stop=[stop]))  # fmt: skip
    assert cut.text == result.text[: result.text.find(stop)]


def test_the_constrained_action_parses(backend):
    out = run_action(backend, "BABS", chat("BABS", "Question: How does the broker route a request?"),
                     max_tokens=96, reask=False)  # fmt: skip
    obj = json.loads(out.results[-1].text)  # the server applied the schema as a grammar
    assert list(obj) == ["thought", "action", "query", "summary_ids"] and obj["action"] in ACTIONS
    assert out.action is not None and len(out.results) == 1
    assert backend._schema_style == "json_object"  # it refused OpenAI's json_schema form, took its own


def test_cancel_mid_stream(backend):
    cancel = threading.Event()
    tokens: list[str] = []

    def on_token(text: str) -> None:
        tokens.append(text)
        if len(tokens) == 3:
            cancel.set()

    result = backend.generate("ROBIN", chat("ROBIN", "Tell me a long story."), GenerationParams(max_tokens=400),
                              on_token, cancel)  # fmt: skip
    assert result.finish_reason == CANCELLED and 3 <= len(tokens) < 400
    after = backend.generate("ROBIN", chat("ROBIN", "Hello"), GenerationParams(max_tokens=3))
    assert after.completion_tokens == 3  # the server is free again


async def test_the_llm_service_over_the_real_server(server_url, system, client):
    system.start_service("forge", BATOS_LLM_BACKEND="openai", BATOS_OPENAI_URL=server_url,
                         BATOS_OPENAI_MODEL=ALIAS)  # fmt: skip
    await system.wait_registered(client, {"llm": 1}, timeout=60)
    tokens: list[str] = []
    reply = await client.call("llm", "generate", {"persona": "ALFRED", "messages": MESSAGES, "max_tokens": 10},
                              on_event=lambda body: tokens.append(body["text"]), timeout=120)  # fmt: skip
    assert tokens and "".join(tokens) == reply["text"] and reply["model"] == ALIAS
    assert 0 < reply["completion_tokens"] <= 10 and reply["persona"] == "ALFRED"
    action = await client.call("llm", "action", {
        "persona": "BABS", "max_tokens": 96, "reask": False,
        "messages": [{"role": "user", "content": "Question: Where is the token budget enforced?"}],
    }, timeout=120)  # fmt: skip
    assert action["valid"] and action["action"]["action"] in ACTIONS
    status = await client.call("llm", "status", {})
    assert status["llm"]["ready"] and status["llm"]["backend"] == "openai" and status["llm"]["url"] == server_url


# -- the kernel's cycles over the real server -----------------------------------------------------------------

SOURCE = '''"""Stock keeping for a small shop."""


def restock(stock, item, count):
    """Add count units of item to the stock mapping."""
    stock[item] = stock.get(item, 0) + count
    return stock
'''
KERNEL_ENV = {  # small budgets: a 135M model on one thread answers in seconds (as in test_kernel_live.py)
    "BATOS_REACT_MAX_STEPS": "1", "BATOS_ANSWER_BUDGET_TOKENS": "500", "BATOS_ANSWER_MAX_TOKENS": "24",
    "BATOS_BRICK_MAX_TOKENS": "80", "BATOS_SANDBOX_TIMEOUT": "3", "BATOS_CYCLE_TIMEOUT": "240",
    "BATOS_AUTOTELIC_PERIOD": "3600",
}
ASK_STATES = ["IDLE", "DECOMPOSING", "REASONING", "SYNTHESIZING", "VALIDATING", "COMPLETE"]


@pytest.mark.timeout(240)
async def test_ask_and_send_through_the_kernel_over_the_real_server(server_url, system, client, tmp_path):
    tree = tmp_path / "src"
    tree.mkdir()
    (tree / "inventory.py").write_text(SOURCE)
    openai = {"BATOS_LLM_BACKEND": "openai", "BATOS_OPENAI_URL": server_url, "BATOS_OPENAI_MODEL": ALIAS}
    system.start_zeo()
    system.start_service("memory")
    system.start_service("ingest", BATOS_INGEST_ROOTS=str(tmp_path))
    system.start_service("forge", **openai)
    system.start_service("kernel", **KERNEL_ENV)
    await system.wait_registered(client, {"kernel": 1, "memory": 1, "ingest": 1, "llm": 1}, timeout=180)
    ingested = await client.call("kernel", "ingest", {"path": str(tree)}, timeout=180)
    assert ingested["files"] == 1 and not ingested["errors"]

    events: list[dict] = []
    reply = await client.call("kernel", "ask", {"question": "How is an item restocked?"},
                              on_event=events.append, timeout=180)  # fmt: skip
    states = [e["state"] for e in events if e.get("event") == "state"]
    tokens = "".join(e["text"] for e in events if e.get("event") == "token")
    assert states == ASK_STATES and tokens  # the answer streamed from the server through forge and kernel
    assert reply["status"] in ("SUCCESS", "SUCCESS_DEGRADED") and reply["timing"]["llm_calls"] >= 1
    assert reply["citations"] and all(c["file_path"] == str(tree / "inventory.py") for c in reply["citations"])
    assert all(c["where"] in reply["answer"] for c in reply["citations"])
    if reply["status"] == "SUCCESS":  # grounded: the model's streamed words are the answer's prose
        assert reply["model_text"].strip() and reply["model_text"].strip() in tokens
        assert all(c["ok"] for c in reply["validation"] if c["attempt"] == max(v["attempt"] for v in
                                                                               reply["validation"]))
    else:  # the stated degraded reply: why, and the evidence itself
        assert reply["reason"] and reply["notes"]

    target = reply["citations"][0]["oid"]  # a chunk object in the image: BRICK's method goes on it
    sent_events: list[dict] = []
    try:
        sent = await client.call("kernel", "send", {"oid": target, "selector": "word_count", "args": ["a b c"]},
                                 on_event=sent_events.append, timeout=180)  # fmt: skip
    except ServiceError as e:  # BRICK's method did not run on the call: refused, with a FAILED cycle
        assert e.code in ("rejected", "sandbox", "unavailable"), (e.code, e.message)
        assert "FAILED in" in e.message or e.code == "unavailable"
        obj = await client.call("kernel", "inspect", {"oid": target})
        assert "word_count" not in obj["methods"]
    else:  # it ran in the sandbox on the call's arguments: persisted, with the source the server generated
        assert sent["generated"] is True and "def word_count(self" in sent["method_source"]
        obj = await client.call("kernel", "inspect", {"oid": target})
        assert "word_count" in obj["methods"]
    assert any(e.get("event") == "token" for e in sent_events)  # BRICK's method streamed through the server too
    status = await client.call("llm", "status", {})
    assert status["llm"]["backend"] == "openai" and status["llm"]["url"] == server_url
