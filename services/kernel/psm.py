"""The Prototypal State Machine: the states a cognitive cycle moves through, as prototype objects in the image.

Every state is a UvmObject cloned from the ``psm_state`` prototype and kept in ``root["psm_states"]``; a
CognitiveCycle's ``state`` slot references one of them. The image therefore says on its own where every cycle
stands and where it may go next (the state's ``next_states`` slot), and ``inspect`` shows it. The table below is
the code's statement of the machine; :func:`install_states` makes the image agree with it at every awakening
(idempotent). What a state *does* (awaiting other services) is asyncio code in the kernel, dispatched on the
state's name: coroutines cannot live in method slots compiled from source, and the orchestration is not code
the system should rewrite about itself.

    IDLE -> DECOMPOSING -> REASONING -> SYNTHESIZING -> VALIDATING -> COMPLETE
            DECOMPOSING -----------------------------------> VALIDATING   (no reasoning needed)
    every non-terminal state -> FAILED

The short path serves missions that need neither retrieval nor generation: a `send` whose method exists (it is
run in the sandbox in VALIDATING) and a `define` of hand-written source (checked in VALIDATING).

IDLE          the cycle exists: mission recorded, nothing done yet
DECOMPOSING   the mission is checked and split into its parts (target resolved, question / call extracted)
REASONING     the ReAct loop (Thought -> Action -> Observation) over the QueryMorph; one ZODB transaction
SYNTHESIZING  the Token Governor assembles the prompt; a persona writes the answer (or BRICK writes a method)
VALIDATING    the output is checked: degenerate text, citations, generated code (policy + sandbox trial)
COMPLETE      terminal, the reply was produced (status SUCCESS or SUCCESS_DEGRADED)
FAILED        terminal, with the reason in the cycle's ``error`` slot
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from persistent.mapping import PersistentMapping

from batos.uvm import Root, UvmObject

STATES_KEY = "psm_states"  # root[STATES_KEY]: state name -> state object
PROTOTYPE_NAME = "psm_state"  # root["prototypes"][PROTOTYPE_NAME]


class State(enum.StrEnum):
    IDLE = "IDLE"
    DECOMPOSING = "DECOMPOSING"
    REASONING = "REASONING"
    SYNTHESIZING = "SYNTHESIZING"
    VALIDATING = "VALIDATING"
    COMPLETE = "COMPLETE"
    FAILED = "FAILED"


@dataclass(frozen=True)
class StateSpec:
    next_states: tuple[State, ...]
    persona: str  # the persona that acts in this state by default (Table 3 active_persona)
    description: str


MACHINE: dict[State, StateSpec] = {
    State.IDLE: StateSpec((State.DECOMPOSING, State.FAILED), "ALFRED", "cycle created, mission recorded"),
    State.DECOMPOSING: StateSpec((State.REASONING, State.VALIDATING, State.FAILED), "ALFRED",
                                 "mission checked and split"),
    State.REASONING: StateSpec((State.SYNTHESIZING, State.FAILED), "BABS", "ReAct retrieval over the QueryMorph"),
    State.SYNTHESIZING: StateSpec((State.VALIDATING, State.FAILED), "ROBIN", "prompt assembled, output generated"),
    State.VALIDATING: StateSpec((State.COMPLETE, State.FAILED), "ALFRED", "output checked"),
    State.COMPLETE: StateSpec((), "ALFRED", "terminal: reply produced"),
    State.FAILED: StateSpec((), "ALFRED", "terminal: failed, reason recorded"),
}

TERMINAL = frozenset(s for s, spec in MACHINE.items() if not spec.next_states)


class IllegalTransition(ValueError):
    def __init__(self, src: str, dst: str):
        super().__init__(f"illegal PSM transition {src} -> {dst}")
        self.src = src
        self.dst = dst


def _state_slots(state: State) -> dict[str, Any]:
    spec = MACHINE[state]
    return {
        "state_name": state.value,
        "next_states": [s.value for s in spec.next_states],
        "terminal": state in TERMINAL,
        "persona": spec.persona,
        "description": spec.description,
    }


def install_states(root: Root) -> bool:
    """Create or update the state prototype and the state objects; True when anything changed."""
    changed = False
    prototypes = root.get("prototypes")
    if prototypes is None:
        raise RuntimeError("the image has no prototypes: awaken() must run before install_states()")
    proto = prototypes.get(PROTOTYPE_NAME)
    if proto is None:
        parents = [prototypes["traits"]] if "traits" in prototypes else []
        proto = UvmObject(name=PROTOTYPE_NAME, parents=parents, state_name="", next_states=[], terminal=False)
        prototypes[PROTOTYPE_NAME] = proto
        changed = True
    states = root.get(STATES_KEY)
    if states is None:
        states = root[STATES_KEY] = PersistentMapping()
        changed = True
    for state in State:
        wanted = _state_slots(state)
        obj = states.get(state.value)
        if obj is None:
            states[state.value] = proto.clone(**wanted)
            changed = True
            continue
        for name, value in wanted.items():  # keep the image in step with this table
            if not obj.has_slot(name) or obj.get_slot(name) != value:
                obj.set_slot(name, value)
                changed = True
    return changed


def state_object(root: Root, name: str) -> UvmObject:
    try:
        return root[STATES_KEY][name]
    except KeyError:
        raise KeyError(f"no PSM state {name!r} in the image") from None


def check_transition(current: UvmObject | None, dst: str) -> None:
    """Ask the current state object (not the table) whether it accepts ``dst``; None means a new cycle."""
    if current is None:
        if dst != State.IDLE:
            raise IllegalTransition("<new>", dst)
        return
    if dst not in current.get_slot("next_states"):
        raise IllegalTransition(current.get_slot("state_name"), dst)
