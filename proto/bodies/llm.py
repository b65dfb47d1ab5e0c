"""The ``llm`` and ``forge`` services' bodies (services/forge: one process serves both).

``llm``: generate, action (one ReAct step, vocabulary in :mod:`proto.react`), count_tokens, adapters,
activate_adapter, deactivate_adapter, info, status. ``forge``: run (curate, script, the steward's instruction),
curate (the dataset only), history (ALFRED's audit of the history), status.

Reply fields that measure a generation (tokens, seconds) default to zero: they are figures for people and the
audit log, and a caller reads only the ones it needs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from batos import personas
from proto.bodies.runtime import Status, StatusReply
from proto.bodies.steward import Instruction
from proto.contract import Call, Reply, command
from proto.react import ReactAction

MAX_TOKENS_LIMIT = 32_768
MAX_STOPS = 16


def _persona(value: str) -> str:
    """The canonical persona name (batos.personas: the one list), or ValueError naming the choices."""
    try:
        return personas.normalize(value)
    except personas.UnknownPersona as e:
        raise ValueError(str(e)) from None


class _PersonaCall(msgspec.Struct, kw_only=True):
    persona: str = personas.DEFAULT_PERSONA  # any case; the service answers with the canonical name

    def __post_init__(self) -> None:
        self.persona = _persona(self.persona)


class Message(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str


class _Chat(_PersonaCall, kw_only=True):
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=5.0)] = 0.0
    timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None  # None: settings.llm_request_timeout


class _Measured(Reply):
    persona: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_s: float = 0.0  # generation start -> last token
    queue_s: float = 0.0  # waiting for the model (one generation at a time)
    adapter: str | None = None  # the persona's adapter that generated, None for the base model
    model: str = ""


class GenerateReply(_Measured, kw_only=True):
    text: str
    ttft_s: float = 0.0  # generation start -> first token
    tokens_per_s: float = 0.0  # decode rate after the first token
    finish_reason: Literal["stop", "length", "cancelled", "timeout"] = "stop"
    max_tokens: int = 0  # the effective limit (clamped to the context window)


@command("llm", "generate")
class Generate(_Chat, Call[GenerateReply], kw_only=True):
    """A chat completion; streams ``token`` events {text}."""

    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    stop: Annotated[list[str], msgspec.Meta(max_length=MAX_STOPS)] = []
    json_schema: dict[str, Any] | None = None  # constrain the output to this JSON schema
    repetition_penalty: Annotated[float, msgspec.Meta(gt=0.0, le=3.0)] = 1.0


class ActionReply(_Measured, kw_only=True):
    action: ReactAction | None  # None when the output could not be parsed (valid False)
    valid: bool
    raw: str  # the model's last output, as written
    attempts: int
    problem: str = ""  # why the output was not usable ("" when valid)


@command("llm", "action")
class Action(_Chat, Call[ActionReply], kw_only=True):
    """One ReAct step in the vocabulary of :mod:`proto.react`; ``token`` events only when ``stream``."""

    constrained: bool = True  # xgrammar / GBNF / response_format; False measures the bare model
    reask: bool = True  # ask once more, told what was wrong, when the output does not parse
    stream: bool = False


class CountTokensReply(Reply):
    tokens: int
    exact: bool  # the served model's own tokenizer (an estimate for remote models)


@command("llm", "count_tokens")
class CountTokens(Call[CountTokensReply]):
    text: str


class BackendInfo(Reply, omit_defaults=True):
    """What the llm backend is (batos settings llm_backend); the fields after ``context_tokens`` are the
    runtime's own and present only for it (unset ones are left out of the body)."""

    backend: str
    model: str
    context_tokens: int
    runtime: str | None = None  # llama.cpp
    gguf: str | None = None
    threads: int | None = None
    load_s: float | None = None
    device: str | None = None  # hf
    dtype: str | None = None
    url: str | None = None  # openai


class AdapterInfo(Reply):
    path: str
    name: str  # the runtime's name for it (unique per load)
    meta: dict[str, Any] = {}  # what the forge recorded: expert, metrics, instruction id...


class AdaptersReply(Reply):
    personas: dict[str, AdapterInfo | None]  # every persona, None where it runs on the base model
    backend: BackendInfo


@command("llm", "adapters")
class Adapters(Call[AdaptersReply]):
    pass


class ActivateAdapterReply(Reply):
    persona: str
    adapter: AdapterInfo


@command("llm", "activate_adapter")
class ActivateAdapter(_PersonaCall, Call[ActivateAdapterReply], kw_only=True):
    """Serve ``persona`` with the adapter in directory ``path`` (kept across restarts)."""

    path: Annotated[str, msgspec.Meta(min_length=1)]
    meta: dict[str, Any] = {}


class DeactivateAdapterReply(Reply):
    persona: str
    removed: bool  # False: it had none


@command("llm", "deactivate_adapter")
class DeactivateAdapter(_PersonaCall, Call[DeactivateAdapterReply]):
    pass


class InfoReply(BackendInfo, kw_only=True):
    queue_waiting: int
    busy: bool


@command("llm", "info")
class Info(Call[InfoReply]):
    pass


class LLMState(BackendInfo, kw_only=True):
    """The llm backend in ``status``: ready, or not loaded and why."""

    ready: bool
    error: str | None = None
    backend: str = ""
    model: str = ""
    context_tokens: int = 0
    queue_waiting: int | None = None


class LLMStatusReply(StatusReply):
    llm: LLMState | None = None  # absent from the forge's own status


@command("llm", "status")
class LLMStatus(Status, Call[LLMStatusReply]):
    pass


@command("forge", "status")
class ForgeStatus(Status, Call[LLMStatusReply]):
    pass


# -- forge ---------------------------------------------------------------------------------------------------


class CurationCounts(Reply):
    cycles_seen: int
    cycles_successful: int
    examples: int
    train: int
    eval: int
    duplicates: int
    capped: int
    unusable: int  # successful cycles with no extractable (inputs, output) pair


class ScriptChoice(Reply):
    """Who wrote the training script: BRICK (``generated``) or the template, and why."""

    origin: Literal["generated", "template"]
    reason: str = ""
    problems: list[str] = []  # why BRICK's script was refused (the first ten)
    generated_chars: int = 0


class DatasetInfo(Reply):
    """The curated files: their combined hash and sizes; paths only where they stay (``curate``)."""

    sha256: str
    train: int
    eval: int
    train_path: str | None = None
    eval_path: str | None = None


class ForgeRunReply(Reply):
    instruction_id: str
    instruction: Instruction  # the body of the steward's ``upgrade``: the caller hands it on as it is
    dataset: DatasetInfo  # no paths: the files were temporary, their contents travel in the instruction
    counts: CurationCounts
    script: ScriptChoice


@command("forge", "run")
class ForgeRun(_PersonaCall, Call[ForgeRunReply], kw_only=True):
    """Curate the persona's golden paths, have BRICK write the training script, answer the steward's instruction.

    Streams ``progress`` events {stage: curation | script | upgrade_requested, done, total}."""

    persona: str
    mission_type: str | None = None
    epochs: int = 1  # bounds: services/forge/training_script.py (bad_args naming them)
    max_steps: int = -1
    generate_script: bool = True  # False: the template script, without asking BRICK
    cycle_id: str | None = None  # the cycle that asked, recorded with the adapter
    format_prompts: int = 4
    logging_steps: int | None = None
    reason: str | None = None  # why the run was asked for (ALFRED's audit says how many new cycles)


class CurateReply(Reply):
    persona: str
    mission_type: str | None
    counts: CurationCounts
    dataset: DatasetInfo  # the files under var/forge_datasets


@command("forge", "curate")
class Curate(_PersonaCall, Call[CurateReply], kw_only=True):
    persona: str
    mission_type: str | None = None
    cap: Annotated[int, msgspec.Meta(ge=1)] = 200  # examples per mission
    eval_percent: Annotated[int, msgspec.Meta(ge=0, lt=100)] = 20  # held-out share


class HistoryReply(Reply):
    """ALFRED's audit: new successful golden-path cycles per persona since its last forge; ``due`` reach the
    threshold (the kernel forges the first of them)."""

    threshold: int
    since: dict[str, str]  # persona -> its last forge (audit-log timestamp form), "" for never
    counts: dict[str, int]
    busy: list[str]  # personas the steward is forging now
    due: list[str]


@command("forge", "history")
class History(Call[HistoryReply]):
    pass
