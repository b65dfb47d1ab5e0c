"""Settings for every BAT OS process, in one place.

Read from environment variables ``BATOS_<FIELD>`` (upper case) by pydantic-settings; a value given to
:func:`load` wins over the environment. No other module reads a ``BATOS_*`` variable (tests/unit/test_config.py
checks). Timing constants live here with their reasons.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent

# -- timing constants (seconds) -------------------------------------------------------------
HEARTBEAT_INTERVAL = 1.0  # broker <-> worker; 1 s keeps failure detection under ~3 s
HEARTBEAT_LIVENESS = 3  # missed intervals before a peer is declared dead (3-5 is reasonable)
RECONNECT_INITIAL = 0.1  # first reconnect delay after the broker is lost
RECONNECT_MAX = 2.0  # backoff ceiling: a restarted broker is found within 2 s
SHUTDOWN_GRACE = 7.0  # in-flight work gets this long after SIGTERM; supervisord waits 10
# a memory call from the kernel or forge embeds one query / writes one record and scans an in-memory matrix
MEMORY_TIMEOUT = 60.0
# one create_fractals batch (the autotelic loop) embeds up to 200 summaries: seconds, not minutes
MEMORY_BATCH_TIMEOUT = 300.0


class Settings(BaseSettings):
    # process
    log_level: str = "INFO"  # logging level of broker and workers
    # which kernel this is, for recovery; "" = kernel@<hostname> (services.kernel.env.instance_name)
    kernel_instance: str = ""
    console_history: str = "~/.batos_history"  # the console's readline history file
    rebuild_llama: bool = False  # `make setup`: retry building llama-cpp-python after a failed build

    # where things live
    var_dir: Path = REPO_ROOT / "var"
    cache_dir: Path = Path(os.path.expanduser("~/.cache/batos"))

    # transport
    # "" = ipc://<var_dir>/broker.sock: a unix socket in the owner-only var/, so file permissions are the
    # authentication (batos.transport). "tcp://HOST:PORT" exposes the broker: turn Curve on with it.
    broker_endpoint: str = ""
    # ZEO: "" = a unix socket var/zeo.sock (owner-only, like the broker's); "HOST:PORT" for a network server
    zeo_address: str = ""
    curve_enabled: bool = False  # CurveZMQ on the broker; console keys allow-listed in var/keys/
    curve_key: str = "console"  # which var/keys/<name>.key_secret a client presents
    # which var/keys/<name>.key_secret a worker presents; the broker lets it serve only the services listed in
    # var/keys/authorized/<name>.services (broker/roles.py)
    curve_service_key: str = "services"

    # broker limits
    service_queue_max: int = 1000  # queued requests per service before `busy`
    client_pending_max: int = 10000  # requests in flight per client before `busy`
    worker_capacity: int = 8  # concurrent requests a worker accepts by default
    extra_services: str = ""  # comma-separated service names beyond proto.Service (extensions, tests)
    max_frame_bytes: int = 64 * 1024 * 1024  # one message; larger replies become `too_large` errors
    broker_max_clients: int = 4096  # client identities the broker holds state for; past it: `busy`
    broker_client_idle_s: float = 60.0  # an idle client's state is dropped after this long
    # a request waits this long (counted from when it was queued, or re-queued after its worker died) for a
    # worker of its service; the slowest to come back, memory_weaver, loads its model and vectors in ~25 s, and
    # took 39 s on a 2-core machine at load 12
    service_wait_s: float = 60.0

    # memory
    zodb_cache_size: int = 100_000
    # and at most this many bytes (ZODB's estimate) per connection: with the count alone, a connection that has
    # touched a 110k-line image holds all of it (63 MiB estimated, ~140 MiB RSS each; bench/rss.py), so every
    # worker grew with the image and with use; 0 = no byte limit
    zodb_cache_bytes: int = 32 * 1024 * 1024
    blob_cache_size: int = 512 * 1024 * 1024
    vector_shard_rows: int = 2048
    # oids never handed out twice across ZEO restarts (batos.zeo_client, batos.zeo_storage); off only to
    # reproduce issue 14's corruption
    zeo_restart_safe: bool = True
    # glibc heap bounds for processes that embed (batos.malloc_tuning); 0 leaves glibc's default
    malloc_mmap_threshold: int = 1024 * 1024
    malloc_arena_max: int = 2
    # ingest embedding runs this much nicer than memory_weaver itself, so a search's query embedding gets the
    # cores first (issue 14 item 6; bench/search_during_ingest.py --niceness 0,10); 0 shares them evenly
    embed_bulk_niceness: int = Field(default=10, ge=0, le=19)

    # ingestion / token governor
    max_chunk_tokens: int = 256
    ingest_max_file_bytes: int = 2 * 1024 * 1024
    # ingest reads only under its roots (issue 13): ingest_home (set by `batos.ctl up` to the directory it was
    # run from; the ingestor's working directory when empty) plus these, comma or os.pathsep separated
    ingest_home: str = ""
    ingest_roots: str = ""

    # llm
    llm_backend: Literal["embedded", "hf", "openai"] = "embedded"
    # embedded: which packaged GGUF (batos.models.LLM_MODELS), run by llama.cpp when it is installed.
    # Qwen2.5-Coder-0.5B: names the right code where SmolLM2-135M does not, ~2x its cost (bench/RESULTS.md);
    # the tests serve smollm2-135m (tests/conftest.py), and so does the transformers fallback.
    llm_model: str = "qwen2.5-coder-0.5b"
    llm_runtime: Literal["auto", "llamacpp", "transformers"] = "auto"  # auto: llama.cpp, else transformers
    # LLM threads on CPU (llama.cpp, or torch for transformers); 0: the cores other programs leave idle,
    # re-decided during a request (quiet: 2 threads ~2x faster here; beside a busy process: 1 is faster).
    # services/forge/spare_cores.py
    llm_threads: int = Field(default=0, ge=0)
    llm_model_path: str = ""  # hf backend: a local model directory
    llm_dtype: str = "auto"  # hf backend: float32, bfloat16, float16, auto
    llm_device: str = "auto"  # cpu, cuda, auto
    openai_url: str = ""  # openai backend: e.g. http://127.0.0.1:8000/v1
    openai_model: str = ""
    openai_api_key: str = ""
    llm_request_timeout: float = 300.0
    llm_context_tokens: int = 0  # 0 = the model's own limit

    # cognition
    react_max_steps: int = 3
    answer_budget_tokens: int = 1200
    answer_max_tokens: int = 320  # ROBIN's answer length
    brick_max_tokens: int = 256  # BRICK's generated method length: a method, not a program
    brick_attempts: int = 2  # one retry, told why, when the reply holds no method or the method fails on the call
    cycle_timeout: float = 900.0
    autotelic_period: float = 60.0
    audit_max_bytes: int = 64 * 1024 * 1024  # the audit log rotates (between lines) past this size
    forge_threshold: int = 5  # new SUCCESS cycles per persona before curation
    forge_program: str = "forge"  # the supervisord program the steward restarts around training
    forge_train_timeout: float = 21600.0  # the steward kills a training run after this long
    # after training, how long the steward waits for the new adapter's decision: the restarted worker loads the
    # model, then judges and activates the adapter
    forge_incarnation_grace: float = 300.0
    # ALFRED's own forge runs (services/kernel/autotelic.py): whether BRICK writes the training script (else the
    # canonical Table 4 template; a small model's script seldom validates and costs a ~700-token generation) and
    # how many held-out prompts the evaluation generates on to score format validity (CPU generation is slow)
    autotelic_forge_script: bool = True
    autotelic_forge_format_prompts: int = 4
    sandbox_timeout: float = 10.0
    sandbox_memory_mb: int = 512

    # `watch` (services/kernel/watch.py): any console sees what the kernel does, whoever asked for it
    # watchers at once per kernel; a watch is a control request (proto.CONTROL): it holds none of the work's slots
    watch_max_watchers: int = 16
    watch_queue_events: int = 256  # per watcher; when full the oldest go and the watcher is told "missed N"
    watch_replay_events: int = 200  # what `watch ID` replays of a cycle's events so far (tokens merged)
    watch_keepalive_s: float = 15.0  # an event this often on a quiet watch: clients time out on silence
    watch_worker_poll_s: float = 2.0  # how often the broker's worker table is compared, while anyone watches

    supervisor_url: str = ""  # steward and batos.ctl: unix://<var_dir>/supervisor.sock by default
    # the supervisord programs `make up` runs on this host, comma separated; "" = all (batos.programs.PROGRAMS).
    # Another host running workers: e.g. "memory_weaver,forge,steward" (batos.hostconf)
    programs: str = ""

    @cached_property
    def log_dir(self) -> Path:
        return self.var_dir / "log"

    @property
    def audit_log(self) -> Path:
        return self.var_dir / "metacognition.jsonl"

    @property
    def steward_dir(self) -> Path:
        """The steward's private state (its runs, the run in flight); no other process reads it."""
        return self.var_dir / "steward"

    @property
    def lora_dir(self) -> Path:
        return self.var_dir / "lora_adapters"

    @property
    def keys_dir(self) -> Path:
        return self.var_dir / "keys"

    @property
    def zeo_client_address(self) -> str | tuple[str, int]:
        """What ``ZEO.ClientStorage`` takes: a unix socket path or a (host, port) pair."""
        if not self.zeo_address:
            return str(self.var_dir / "zeo.sock")
        if self.zeo_address.startswith("/") or ":" not in self.zeo_address:
            return self.zeo_address
        host, _, port = self.zeo_address.rpartition(":")
        return host or "127.0.0.1", int(port)

    @property
    def broker_endpoint_file(self) -> Path:
        """Where the broker writes the endpoint it actually bound (port 0 / ``*`` in tests)."""
        return self.var_dir / "broker.endpoint"

    @model_validator(mode="after")
    def _default_endpoint(self) -> Settings:
        if not self.broker_endpoint:
            from batos.transport import default_broker_endpoint

            self.broker_endpoint = default_broker_endpoint(self.var_dir)
        return self

    # extra="ignore": a BATOS_* variable for a removed or future field does not stop a process starting
    model_config = SettingsConfigDict(env_prefix="BATOS_", extra="ignore", arbitrary_types_allowed=True,
                                      ignored_types=(cached_property,))


def load(**overrides: Any) -> Settings:
    """The settings: ``overrides`` win over ``BATOS_<FIELD>`` environment variables, which win over defaults.

    A bad value raises pydantic's ``ValidationError`` naming the field and the value."""
    return Settings(**overrides)
