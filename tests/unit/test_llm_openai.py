"""The OpenAI-compatible backend against a small fake chat-completions server (http.server in a thread).

The fake speaks the streaming protocol (SSE ``data:`` lines, ``[DONE]``, a final usage chunk) the way
vLLM and llama.cpp's server do; it records each request so the tests can check what was sent.
"""

import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import proto
from proto.react import action_schema
from services.forge.backends.base import CANCELLED, LENGTH, STOP, TIMEOUT, BackendError, GenerationParams
from services.forge.backends.openai_compat import OpenAICompatBackend
from services.forge.structured import run_action

MESSAGES = [{"role": "system", "content": "You are ROBIN."}, {"role": "user", "content": "hello"}]


class QuietServer(ThreadingHTTPServer):
    """A client hanging up (the cancellation tests; a kept-alive connection closed) is expected here, not an
    error to print a traceback for in the middle of the suite's output."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeServer:
    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.pieces = ["Hello", ",", " Architect", "."]
        self.delay = 0.0
        self.status = 200
        self.error_body = ""
        self.usage = True
        self.finish_reason = "stop"
        self.hang_up_after = None  # close the stream after this many pieces, without [DONE]
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers["Content-Length"])
                fake.requests.append(json.loads(self.rfile.read(length)))
                fake.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    self._plain(404, '{"error": {"message": "no such route"}}')
                elif fake.status != 200:
                    self._plain(fake.status, fake.error_body)
                else:
                    self._stream()

            def _plain(self, status, text):
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _chunk(self, data: bytes):
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            def _event(self, obj):
                self._chunk(f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode())

            def _stream(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    self._chunk(b": ping\n\n")  # an SSE comment (keep-alive)
                    model = fake.requests[-1]["model"]
                    for i, piece in enumerate(fake.pieces):
                        if i == fake.hang_up_after:
                            self.wfile.write(b"0\r\n\r\n")
                            return
                        time.sleep(fake.delay)
                        self._event({"model": model, "choices": [{"index": 0, "delta": {"content": piece}}]})
                    self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": fake.finish_reason}]})
                    if fake.usage:
                        self._event({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 4}})
                    self._event("[DONE]")
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client hung up (cancellation)

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.close()


@pytest.fixture
def backend(server):
    return OpenAICompatBackend(server.url, "served-model", "sk-test")


def test_streams_tokens_and_reports_usage(server, backend):
    tokens: list[str] = []
    result = backend.generate("ROBIN", MESSAGES, GenerationParams(max_tokens=20, temperature=0.3), tokens.append)
    assert tokens == ["Hello", ",", " Architect", "."]
    assert result.text == "Hello, Architect."
    assert (result.prompt_tokens, result.completion_tokens) == (11, 4)
    assert result.finish_reason == STOP and result.model == "served-model" and result.adapter is None
    assert 0 <= result.ttft_s <= result.total_s
    sent = server.requests[0]
    assert sent["model"] == "served-model" and sent["stream"] is True and sent["max_tokens"] == 20
    assert sent["messages"] == MESSAGES and sent["temperature"] == 0.3
    assert "response_format" not in sent and "stop" not in sent
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


def test_without_usage_counts_are_estimated(server, backend):
    server.usage = False
    server.finish_reason = "length"
    result = backend.generate("ROBIN", MESSAGES, GenerationParams())
    assert result.completion_tokens == 4  # one per content chunk
    assert result.prompt_tokens > 0
    assert result.finish_reason == LENGTH


def test_stop_strings_are_sent_and_applied_locally(server, backend):
    tokens: list[str] = []
    result = backend.generate("ROBIN", MESSAGES, GenerationParams(stop=[" Arch"]), tokens.append)
    assert result.text == "Hello," == "".join(tokens)
    assert server.requests[0]["stop"] == [" Arch"]


def test_json_schema_becomes_response_format(server, backend):
    server.pieces = ['{"thought": "t", "action": "answer", ', '"query": "q", "summary_ids": []}']
    out = run_action(backend, "BABS", MESSAGES)
    assert out.action is not None and len(out.results) == 1
    fmt = server.requests[0]["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"] == action_schema()  # proto.react's vocabulary, as the kernel asks in
    assert "repetition_penalty" not in server.requests[0]  # not an OpenAI parameter


def test_unreachable_endpoint_is_unavailable():
    with socket.socket() as s:  # bound but not listening, held for the whole test: nobody else can take the port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        backend = OpenAICompatBackend(f"http://127.0.0.1:{port}/v1", "m")
        with pytest.raises(BackendError) as err:
            backend.generate("ROBIN", MESSAGES, GenerationParams())
    assert err.value.code == proto.ErrorCode.UNAVAILABLE
    assert f"cannot reach LLM endpoint http://127.0.0.1:{port}/v1" in err.value.message


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, proto.ErrorCode.BAD_ARGS), (401, proto.ErrorCode.UNAVAILABLE), (503, proto.ErrorCode.UNAVAILABLE)],
)
def test_http_errors_carry_the_servers_message(server, backend, status, code):
    server.status = status
    server.error_body = json.dumps({"error": {"message": "maximum context length is 4096 tokens"}})
    with pytest.raises(BackendError) as err:
        backend.generate("ROBIN", MESSAGES, GenerationParams())
    assert err.value.code == code
    assert "maximum context length is 4096 tokens" in err.value.message and str(status) in err.value.message


def test_a_stream_cut_short_is_an_error(server, backend):
    server.hang_up_after = 2
    with pytest.raises(BackendError) as err:
        backend.generate("ROBIN", MESSAGES, GenerationParams())
    assert err.value.code == proto.ErrorCode.UNAVAILABLE and "before [DONE]" in err.value.message


@pytest.mark.parametrize("url", ["", "ftp://x/v1", "localhost:8000"])
def test_a_bad_url_is_refused_at_construction(url):
    with pytest.raises(BackendError, match="not an http"):
        OpenAICompatBackend(url, "m")


def test_a_long_prompt_is_refused_when_the_context_is_known(server):
    backend = OpenAICompatBackend(server.url, "m", context_tokens=50)
    with pytest.raises(BackendError) as err:
        backend.generate("ROBIN", [{"role": "user", "content": "word " * 200}], GenerationParams())
    assert err.value.code == proto.ErrorCode.BAD_ARGS and "context is 50 tokens" in err.value.message
    assert server.requests == []


def test_cancel_mid_stream_closes_the_connection_quickly(server, backend):
    server.pieces = ["tok"] * 100
    server.delay = 0.05
    cancel = threading.Event()
    tokens: list[str] = []

    def on_token(t):
        tokens.append(t)
        if len(tokens) == 3:
            threading.Timer(0.01, cancel.set).start()

    started = time.monotonic()
    result = backend.generate("ROBIN", MESSAGES, GenerationParams(), on_token, cancel)
    assert result.finish_reason == CANCELLED
    assert 3 <= len(tokens) < 10
    assert time.monotonic() - started < 1.5


def test_deadline_interrupts_a_silent_server(server, backend):
    server.pieces = ["slow"]
    server.delay = 3.0  # the server says nothing for 3 s (a long prefill)
    started = time.monotonic()
    result = backend.generate("ROBIN", MESSAGES, GenerationParams(deadline=time.monotonic() + 0.3))
    assert result.finish_reason == TIMEOUT
    assert time.monotonic() - started < 1.5


def test_persona_adapter_maps_to_a_served_model_name(server, backend):
    with pytest.raises(BackendError) as err:
        backend.activate_adapter("BRICK", "/var/lora_adapters/brick_v2")
    assert err.value.code == proto.ErrorCode.BAD_ARGS and "meta.model" in err.value.message
    info = backend.activate_adapter("BRICK", "/var/lora_adapters/brick_v2", {"model": "brick-lora"})
    assert info["model"] == "brick-lora" and backend.adapters()["BRICK"]["path"].endswith("brick_v2")
    assert backend.generate("BRICK", MESSAGES, GenerationParams()).adapter == "brick-lora"
    assert backend.generate("ROBIN", MESSAGES, GenerationParams()).adapter is None
    assert [r["model"] for r in server.requests] == ["brick-lora", "served-model"]
    assert backend.deactivate_adapter("BRICK") is True and backend.deactivate_adapter("BRICK") is False


def test_count_tokens_is_an_estimate():
    backend = OpenAICompatBackend("http://127.0.0.1:9/v1", "m")
    assert backend.count_tokens("hello world") == 2
    assert backend.count_tokens("") == 0
