"""Per-persona LoRA adapters on one shared base model (PEFT), switched per request.

The base model is loaded once. The first adapter wraps it in a ``PeftModel``; later ones are added with
``load_adapter``. A request for a persona with an adapter runs with ``set_adapter``; one for a persona
without runs inside ``disable_adapter()`` (the base weights, untouched). Switching costs microseconds:
nothing is reloaded or merged.

Replacing a persona's adapter (a newly forged ``brick_v2``) loads the new one under a fresh PEFT name
before dropping the old, so a bad file leaves the old adapter in service.

Not thread-safe by itself: the caller (LocalBackend) holds its generation lock around ``use`` and every
change.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import proto
from services.forge.backends.base import BackendError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Adapter:
    persona: str
    path: str
    peft_name: str  # the name PEFT knows it by (unique per load)
    meta: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.peft_name, "meta": dict(self.meta)}


def check_adapter_dir(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise BackendError(proto.ErrorCode.BAD_ARGS, f"adapter path {str(path)!r} is not a directory")
    if not (p / ADAPTER_CONFIG).is_file():
        raise BackendError(proto.ErrorCode.BAD_ARGS, f"adapter path {str(path)!r} has no {ADAPTER_CONFIG}")
    return p


class AdapterSet:
    def __init__(self, base_model: Any):
        self._base = base_model
        self._model: Any = base_model  # the PeftModel once an adapter is loaded
        self._by_persona: dict[str, Adapter] = {}
        self._serial = itertools.count(1)

    @property
    def model(self) -> Any:
        return self._model

    @property
    def is_peft(self) -> bool:
        return self._model is not self._base

    def info(self) -> dict[str, dict[str, Any]]:
        return {persona: a.info() for persona, a in self._by_persona.items()}

    def get(self, persona: str) -> Adapter | None:
        return self._by_persona.get(persona)

    def activate(self, persona: str, path: str | Path, meta: dict[str, Any] | None = None) -> Adapter:
        directory = check_adapter_dir(path)
        name = f"{persona.lower()}_{next(self._serial)}"
        try:
            if not self.is_peft:
                from peft import PeftModel

                self._model = PeftModel.from_pretrained(self._base, str(directory), adapter_name=name)
                self._model.eval()
            else:
                self._model.load_adapter(str(directory), adapter_name=name)
        except Exception as e:  # peft raises ValueError/KeyError/RuntimeError for mismatched adapters
            raise BackendError(proto.ErrorCode.BAD_ARGS, f"cannot load adapter {str(path)!r} for {persona}: {e}") from e
        old = self._by_persona.get(persona)
        adapter = Adapter(persona, str(directory), name, dict(meta or {}))
        self._by_persona[persona] = adapter
        if old is not None:
            self._drop(old.peft_name)
        return adapter

    def deactivate(self, persona: str) -> bool:
        adapter = self._by_persona.pop(persona, None)
        if adapter is None:
            return False
        self._drop(adapter.peft_name)
        return True

    def _drop(self, peft_name: str) -> None:
        if not self._by_persona:
            # The last adapter: take the LoRA layers out so base-only generation pays no wrapper cost.
            self._model = self._model.unload()
            self._base = self._model
            return
        self._model.delete_adapter(peft_name)

    @contextlib.contextmanager
    def use(self, persona: str) -> Iterator[tuple[Any, str | None]]:
        """The model to generate with for ``persona`` and the adapter's PEFT name (None = base)."""
        adapter = self._by_persona.get(persona)
        if adapter is not None:
            self._model.set_adapter(adapter.peft_name, inference_mode=True)
            yield self._model, adapter.peft_name
        elif self.is_peft:
            with self._model.disable_adapter():
                yield self._model, None
        else:
            yield self._model, None
