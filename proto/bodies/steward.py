"""The ``steward`` service's bodies (services/forge/steward*.py): one upgrade, and the record of the last ones.

``forge.run`` answers with an :class:`Instruction` (its ``instruction`` field); the kernel hands it to
``steward.upgrade`` as it is. The steward streams the run as events (started, stopped, stage, progress,
output, stage_done, stored, restarted | restart_failed, finished, incarnated) and answers
:class:`UpgradeReply`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from batos import personas
from proto.bodies.runtime import Status, StatusReply
from proto.contract import Call, Reply, command

DEFAULT_TRAIN_TIMEOUT = 6 * 3600.0  # seconds; a CPU run of 1-3 epochs on a few hundred examples fits easily

RunId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]+\Z", max_length=128)]  # it names a directory
Program = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]+\Z", max_length=64)]  # a supervisord program
DatasetFile = Literal["train.jsonl", "eval.jsonl"]


def _now() -> str:
    return datetime.now(UTC).isoformat()


class RunBrief(Reply):
    id: str
    persona: str
    program: str
    origin: str
    created_at: str


class UpgradeReply(Reply):
    """The run's result. ``ok``: trained and evaluated; ``decision`` is the restarted worker's judgement of the
    adapter (activated | rejected), None when it did not come within the grace period (``decision_reason``)."""

    ok: bool
    reason: str | None = None  # why not ok
    returncode: int | None = None  # of the training script
    metrics: dict[str, Any] | None = None  # the evaluation's metrics.json: base, previous, adapter
    expert: str | None = None  # the LoRA expert's name in the Living Image
    expert_oid: str | None = None
    training_meta: dict[str, Any] | None = None
    restarted: bool = False  # the program is running again
    program_state: str | None = None
    restart_error: str | None = None
    seconds: float = 0.0
    decision: str | None = None
    decision_reason: str | None = None


@command("steward", "upgrade")
class Instruction(Call[UpgradeReply]):
    """The body of ``steward.upgrade`` (``forge.run`` answers with it): the whole run, nothing through files."""

    id: RunId
    persona: str
    script: Annotated[str, msgspec.Meta(min_length=1)]  # the training script's source
    config: Annotated[dict[str, Any], msgspec.Meta(min_length=1)]  # what the script and evaluation read
    files: dict[DatasetFile, str] = {}  # the curated dataset's contents
    program: Program = "forge"  # the program stopped while it trains
    origin: Literal["generated", "template"] = "template"  # who wrote the script
    evaluate: bool = True  # run the evaluation module after a successful training script
    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = DEFAULT_TRAIN_TIMEOUT
    previous_expert: str | None = None  # the expert active for the persona: the evaluation's reference
    created_at: str = msgspec.field(default_factory=_now)

    def __post_init__(self) -> None:
        try:
            self.persona = personas.normalize(self.persona)
        except personas.UnknownPersona as e:
            raise ValueError(str(e)) from None

    def describe(self) -> RunBrief:
        return RunBrief(id=self.id, persona=self.persona, program=self.program, origin=self.origin,
                        created_at=self.created_at)


class RunRecord(Reply):
    """One finished run, as ``runs.jsonl`` keeps it."""

    id: str | None = None
    persona: str | None = None
    program: str | None = None
    origin: str | None = None
    created_at: str | None = None
    finished_at: str | None = None
    ok: bool = False
    reason: str | None = None
    expert: str | None = None
    decision: str | None = None
    seconds: float | None = None


class StewardStatusReply(StatusReply):
    runs: list[RunRecord] = []  # the last few, oldest first
    last_forge: dict[str, str] = {}  # persona -> time of its latest forge (failed ones too)
    busy: list[str] = []  # the persona being forged now
    current: RunBrief | None = None


@command("steward", "status")
class StewardStatus(Status, Call[StewardStatusReply]):
    pass
