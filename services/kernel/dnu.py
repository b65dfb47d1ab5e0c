"""`send`, `define` and `_doesNotUnderstand_`: messages to objects in the image, generated code in the sandbox.

send OID SELECTOR args kwargs -- the selector is looked up on the target (own slots and methods, then parents):
  * a method: a ``message`` cycle, IDLE -> DECOMPOSING -> VALIDATING (run in the sandbox) -> COMPLETE;
  * a data slot: the same short cycle; its value is the result (arguments are an error);
  * a read-only builtin (get_slot, has_slot, slot_names, own_slots, method_names): the same, answered in-process;
  * nothing (DoesNotUnderstand): an ``unhandled_message`` cycle, BRICK's:
      DECOMPOSING  snapshot of the receiver (slots, other methods) and the call;
      REASONING    one retrieval from memory (`search`: the selector's words, the prototype, slot and method names)
                   onto a QueryMorph (one transaction);
      SYNTHESIZING BRICK writes ``def SELECTOR(self, ...)`` (llm generate, tokens streamed), shown the receiver's
                   slots, its other methods' signatures and docstrings, and the related code; the method is cut
                   out of the reply and checked against the code policy;
      VALIDATING   a method that never reads an argument it was called with is refused unrun (it cannot compute
                   from them); otherwise it runs in the sandbox on a copy of the slots with the real arguments.
                   It is accepted only if it returns normally AND does something (a value, a slot change or
                   output: a method that returns None and changes nothing is not an answer). A refused attempt
                   (no code, policy, ignored arguments, exception, timeout, did nothing) gets ONE retry, told the
                   reason and shown its code;
      COMPLETE     only if accepted: in ONE transaction the method is stored on the target
                   (define_method: source, version, cycle id, generated_by BRICK), slot updates are written back,
                   and the cycle completes. Later sends find the stored method: no LLM, still sandboxed.
    When the retry fails too, the cycle ends FAILED with the last reason (``rejected`` or ``sandbox``), logged as
    a DNU_OUTCOME FAILURE event; nothing is stored.

Slot updates made by a method (``self.x = v``) are written back only for slots whose value was plain data
(None, bool, int, float, str, and lists/dicts of those) or new: the sandbox sees other values (persistent
objects, containers) as JSON copies or repr strings, which must not overwrite the originals.

define OID SELECTOR source -- a ``define_method`` cycle, IDLE -> DECOMPOSING (target) -> VALIDATING (the code
policy, a parse: never a compile or a run in the kernel) -> COMPLETE (stored, one transaction). No trial run:
a method that takes arguments cannot be run without them, and every send runs it in the sandbox anyway.

No method source is ever compiled or executed in the kernel: lookup hands back source text (batos.uvm.BoundMethod)
and every default, decorator and body is evaluated only inside the sandbox process.
"""

from __future__ import annotations

import ast
import asyncio
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from batos.audit import AuditEvent
from batos.errors import ServiceError
from batos.uvm import (
    BUILTIN_SELECTORS,
    RESERVED_NAMES,
    BoundMethod,
    DoesNotUnderstand,
    Root,
    UvmObject,
    method_info,
    oid_hex,
    prototype_of,
)
from proto import ErrorCode
from proto.bodies import llm
from services.kernel import code_policy, sandbox
from services.kernel import cycle as records
from services.kernel.env import Emit, KernelEnv
from services.kernel.psm import State
from services.kernel.react import retrieve
from services.kernel.run import CycleRun, execute
from services.kernel.sandbox_result import data_shape_problem

READ_ONLY_BUILTINS = frozenset({"get_slot", "has_slot", "slot_names", "own_slots", "method_names"})
CONTEXT_CHUNKS = 2
CONTEXT_CHARS = 700  # per chunk in BRICK's prompt: a 135M model drowns in long context
SLOT_PROMPT_CHARS = 120
ARGS_MAX_DEPTH = 32  # the sandbox's JSON copy stops at 40 levels: deeper would be silently cut
ARGS_MAX_ITEMS = 100_000
_PLAIN_SCALARS = (type(None), bool, int, float, str)


# -- the receiver, as the sandbox and BRICK see it --------------------------------------------------


@dataclass
class Receiver:
    oid: str
    name: str
    prototype: str
    kind: str  # method | slot | builtin | missing
    slots: dict[str, Any]  # every slot in the chain, the receiver's own winning
    plain: set[str]  # slots whose value is plain data (may be written back)
    methods: dict[str, str]  # selector -> source, for the chain's other methods
    own: set[str] = field(default_factory=set)  # the receiver's own slot names (they shadow its own methods)
    source: str | None = None  # the selector's method source (kind == method)
    version: int | None = None
    value: Any = None  # kind == slot / builtin result
    extra: dict[str, Any] = field(default_factory=dict)


def is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN_SCALARS):
        return True
    if type(value) is list:
        return all(is_plain(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False


def _slot_value(value: Any) -> Any:
    if isinstance(value, UvmObject):
        return {"oid": oid_hex(value), "name": value.uvm_name}
    return value


def snapshot(root: Root, conn: Any, target_oid: str, selector: str, args: list[Any] | None = None) -> Receiver:
    """Look ``selector`` up on the target and copy what running or writing it needs (in a read)."""
    try:
        obj = records.resolve_target(root, conn, target_oid)
    except KeyError as e:
        raise ServiceError(ErrorCode.NOT_FOUND, str(e).strip("\"'")) from None
    if not isinstance(obj, UvmObject):
        raise ServiceError(ErrorCode.BAD_ARGS, f"object {target_oid} is the root mapping, not a UvmObject: "
                                               "it has no methods to send to")
    chain = list(obj._chain())
    slots: dict[str, Any] = {}
    methods: dict[str, str] = {}
    for o in reversed(chain):  # parents first, so the receiver's own slots win
        slots.update({k: _slot_value(v) for k, v in o.own_slots().items()})
    for o in chain:
        for name in o.method_names():
            method = o.method_source(name)
            if name != selector and name not in methods and method is not None:
                methods[name] = method.source
    rec = Receiver(oid=oid_hex(obj), name=obj.uvm_name, prototype=prototype_of(obj, root["prototypes"]),
                   kind="missing", slots=slots, plain={k for k, v in slots.items() if is_plain(v)}, methods=methods,
                   own=set(obj.slot_names()))
    try:
        found = obj.lookup(selector)
    except DoesNotUnderstand:
        return rec
    except (AttributeError, TypeError) as e:
        raise ServiceError(ErrorCode.BAD_ARGS, f"cannot send {selector!r}: {e}") from None
    if isinstance(found, BoundMethod):  # source text only: the kernel never compiles or runs it
        rec.kind, rec.source, rec.version = "method", found.source, found.version
    elif selector in BUILTIN_SELECTORS and selector not in slots:  # lookup reached the class's builtins
        if selector not in READ_ONLY_BUILTINS:
            raise ServiceError(ErrorCode.BAD_ARGS, f"#{selector} changes the image's structure; it cannot be sent "
                                                   f"from the console (read-only builtins: "
                                                   f"{', '.join(sorted(READ_ONLY_BUILTINS))})")
        rec.kind = "builtin"
        try:
            rec.value = _render(found(*(args or [])))
        except TypeError as e:
            raise ServiceError(ErrorCode.BAD_ARGS, f"#{selector}: {e}") from None
    else:
        rec.kind, rec.value = "slot", _render(found)
    return rec


def _render(value: Any) -> Any:
    return sandbox.to_jsonable(_slot_value(value))


# -- the public entry points -------------------------------------------------------------------------


async def send(env: KernelEnv, emit: Emit, mission: dict[str, Any], target_oid: str, selector: str,
               args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    _check_call(selector, args, kwargs)
    rec = await env.image.read(snapshot, target_oid, selector, args)
    if rec.kind == "missing":
        run = CycleRun(env, emit, mission_type="unhandled_message", mission=mission, target_oid=target_oid,
                       persona="BRICK")
        return await execute(run, lambda r: _does_not_understand(r, selector, args, kwargs))
    run = CycleRun(env, emit, mission_type="message", mission=mission, target_oid=target_oid, persona="BRICK")
    return await execute(run, lambda r: _found(r, selector, args, kwargs))


async def define(env: KernelEnv, emit: Emit, mission: dict[str, Any], target_oid: str, selector: str,
                 source: str) -> dict[str, Any]:
    """``source`` is not blank and ``selector`` is an identifier: proto.bodies.kernel.Define says so."""
    try:
        code_policy.check_selector(selector)
    except code_policy.PolicyViolation as e:
        raise ServiceError(ErrorCode.BAD_ARGS, e.reason) from None
    if selector in RESERVED_NAMES:
        raise ServiceError(ErrorCode.BAD_ARGS, f"#{selector} is a built-in of every object; a method of that name "
                                               "would shadow it: choose another selector")
    run = CycleRun(env, emit, mission_type="define_method", mission=mission, target_oid=target_oid, persona="BRICK")
    return await execute(run, lambda r: _define(r, selector, source))


def _check_call(selector: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """What the request's type (proto.bodies.kernel.Send: an identifier, a list, a map) cannot say: the object
    model's own names, and the shape of the data a sandboxed method may get."""
    if selector.startswith("_"):
        raise ServiceError(ErrorCode.BAD_ARGS, f"selector {selector!r} is private ('_' names are never sent)")
    if selector in RESERVED_NAMES and selector not in BUILTIN_SELECTORS:
        raise ServiceError(ErrorCode.BAD_ARGS, f"#{selector} is part of the object model, not a message; "
                                               f"builtins that can be sent: {', '.join(sorted(READ_ONLY_BUILTINS))}")
    problem = data_shape_problem([args, kwargs], max_depth=ARGS_MAX_DEPTH, max_nodes=ARGS_MAX_ITEMS)
    if problem:  # a method's arguments are JSON data of a sane shape, or the call is refused here
        raise ServiceError(ErrorCode.BAD_ARGS, f"arguments of #{selector} refused: {problem.removeprefix('value: ')} "
                                               "(JSON data: strings, numbers, booleans, null, lists, maps)")


# -- cycles ------------------------------------------------------------------------------------------


async def _found(run: CycleRun, selector: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    await run.to(State.DECOMPOSING, f"#{selector} on {run.target_oid}")
    rec = await run.env.image.read(snapshot, run.target_oid, selector, args)
    if rec.kind == "missing":  # removed meanwhile: not an invitation to generate code behind the sender's back
        raise ServiceError(ErrorCode.CONFLICT, f"#{selector} disappeared from {run.target_oid} during the send")
    await run.to(State.VALIDATING, f"{rec.kind} #{selector}")
    if rec.kind in ("slot", "builtin"):
        if rec.kind == "slot" and (args or kwargs):
            raise ServiceError(ErrorCode.BAD_ARGS, f"#{selector} is a data slot; it takes no arguments")
        await run.complete("SUCCESS", {"result": rec.value, "kind": rec.kind}, output=rec.value)
        return {"status": "SUCCESS", "result": rec.value, "kind": rec.kind, "generated": False}
    result = await _sandboxed(run, rec, rec.source or "", selector, args, kwargs)
    written = await _finish(run, selector, rec, result, source=None)
    return {"status": "SUCCESS", "result": result.value, "kind": "method", "generated": False,
            "method_version": rec.version, "stdout": result.stdout, "slot_updates": written["slots"]}


async def _does_not_understand(run: CycleRun, selector: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    await run.to(State.DECOMPOSING, f"#{selector} not understood by {run.target_oid}")
    rec = await run.env.image.read(snapshot, run.target_oid, selector, args)
    call = render_call(selector, args, kwargs)
    await run.to(State.REASONING)
    context = await retrieve(run, f"Write the method {call} for object {rec.oid} ({rec.prototype or rec.name})",
                             retrieval_query(rec, selector))
    await run.to(State.SYNTHESIZING, "BRICK writes the method")

    async def generate(prompt: str) -> str:
        reply = await run.llm(llm.Generate(persona="BRICK", messages=[llm.Message("user", prompt)],
                                           max_tokens=run.env.settings.brick_max_tokens), stream=True)
        return reply.text

    async def trial(source: str) -> sandbox.SandboxResult:
        if run.state != State.VALIDATING.value:
            await run.to(State.VALIDATING, "sandbox trial with the real arguments")
        return await _sandboxed(run, rec, source, selector, args, kwargs, raise_on_failure=False)

    async def refused(t: Trial) -> None:
        await run.note(f"BRICK attempt {t.attempt}/{attempts} refused: {t.problem}")

    attempts = run.env.settings.brick_attempts
    trials = await write_method(generate, trial, rec, selector, args, kwargs, context.chunks, attempts=attempts,
                                on_refused=refused)
    last = trials[-1]
    if last.problem:
        reason = f"BRICK's reply held no acceptable method after {len(trials)} attempts: {last.problem}"
        await _dnu_outcome(run, rec, selector, "FAILURE", source=last.source, prompt=last.prompt, error=reason,
                           raw=last.raw)
        details = {}
        if last.result is not None and not last.result.ok:
            details = {"traceback": last.result.traceback or "", "stderr": last.result.stderr[-2000:]}
        raise ServiceError(ErrorCode.SANDBOX if last.result is not None and not last.result.ok
                           else ErrorCode.REJECTED, reason, details)
    assert last.source is not None and last.result is not None
    written = await _finish(run, selector, rec, last.result, source=last.source)
    await _dnu_outcome(run, rec, selector, "SUCCESS", source=last.source, prompt=last.prompt, result=last.result.value)
    return {"status": "SUCCESS", "result": last.result.value, "kind": "method", "generated": True,
            "method_source": last.source, "method_version": written["version"], "stdout": last.result.stdout,
            "slot_updates": written["slots"], "context": [c.where for c in context.chunks], "attempts": len(trials)}


async def _define(run: CycleRun, selector: str, source: str) -> dict[str, Any]:
    await run.to(State.DECOMPOSING, f"define #{selector} on {run.target_oid}")
    rec = await run.env.image.read(snapshot, run.target_oid, selector)  # the target exists, is a UvmObject
    if selector in rec.own:  # lookup finds an object's own slots before its own methods
        raise ServiceError(ErrorCode.CONFLICT, f"{run.target_oid} has a data slot #{selector}; a method of that "
                                               "name would never be found")
    await run.to(State.VALIDATING, "code policy (parsed, not run)")
    try:
        checked = code_policy.validate_method_source(source, selector)
    except code_policy.PolicyViolation as e:
        raise ServiceError(ErrorCode.REJECTED, f"method refused by the code policy: {e}") from None
    version = await run.env.image.transact(_store, run.cycle_id, run.target_oid, selector, checked.source,
                                           {"defined_by": "architect", "cycle_id": run.cycle_id}, {}, [], set(),
                                           set())
    await run.completed("SUCCESS", output=checked.source)
    await run.audit("METHOD_DEFINED", status="SUCCESS", persona="BRICK", receiver_oid=run.target_oid,
                    selector=selector, method_source=checked.source, version=version["version"])
    return {"status": "SUCCESS", "oid": run.target_oid, "selector": selector, "version": version["version"],
            "params": list(checked.params)}


# -- the pieces ------------------------------------------------------------------------------------


def render_call(selector: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{selector}({', '.join(parts)})"


def signature_hint(selector: str, args: list[Any], kwargs: dict[str, Any]) -> str:
    params = ["self", *(f"arg{i + 1}" for i in range(len(args))), *(f"{k}=None" for k in kwargs)]
    return f"def {selector}({', '.join(params)}):"


def retrieval_query(rec: Receiver, selector: str) -> str:
    """What memory is searched for: the selector's words, the prototype, the slots and the other methods."""
    words = " ".join(part for part in selector.split("_") if part)
    return f"{words} {selector} {rec.prototype} {' '.join(sorted(rec.slots))} {' '.join(sorted(rec.methods))}"


def _method_line(name: str, source: str) -> str:
    try:
        info = method_info(name, source)
    except ValueError:
        return f"#   {name}(...)"
    doc = f"  -- {info.doc.splitlines()[0][:80]}" if info.doc else ""
    return f"#   self.{info.signature.replace('(self, ', '(').replace('(self)', '()')}{doc}"


def brick_prompt(rec: Receiver, selector: str, call: str, args: list[Any], kwargs: dict[str, Any],
                 chunks: list[Any], problem: str = "", previous: str | None = None) -> str:
    """Short, code-shaped, ending in the signature to complete: a 135M model copies prose it is shown."""
    slots = [f"#   self.{k} = {_short(v)}" for k, v in sorted(rec.slots.items()) if k != "vector_embedding"][:20]
    lines = [f"# A method for BAT OS object {rec.oid} ({rec.prototype or rec.name}).",
             "# Its slots:", *(slots or ["#   (none)"])]
    if rec.methods:
        lines += ["# Its other methods (call them as self.name(...)):",
                  *(_method_line(n, src) for n, src in sorted(rec.methods.items())[:12])]
    lines += [f"# It must support the call: obj.{call}",
              "# Read slots as self.<name>. Return the result. No files, no network. Imports only inside the "
              f"method, only from: {', '.join(sorted(code_policy.ALLOWED_MODULES))}."]
    for c in chunks[:CONTEXT_CHUNKS]:
        lines += [f"# Related code from {c.where}:", *(f"#   {ln}" for ln in c.text[:CONTEXT_CHARS].splitlines())]
    if problem:
        if previous:
            lines += ["# A previous answer was:", *(f"#   {ln}" for ln in previous[:CONTEXT_CHARS].splitlines())]
        lines.append(f"# A previous answer was refused: {problem[:400]}")
    lines += ["Complete this method. Reply with the Python code only.", "```python",
              signature_hint(selector, args, kwargs)]
    return "\n".join(lines)


def extract(raw: str, selector: str, signature: str) -> str:
    """The method in BRICK's reply: a whole ``def`` anywhere in it, or else -- because the prompt ends with the
    signature -- the reply read as that signature's body. Either way it must then pass the code policy."""
    try:
        return code_policy.extract_method_source(raw, selector)
    except code_policy.PolicyViolation:
        body = raw.split("```")[0].rstrip()
        if not body.strip():
            raise
        lines = body.splitlines()
        indent = "" if all(not ln.strip() or ln.startswith((" ", "\t")) for ln in lines) else "    "
        source = code_policy.extract_method_source(signature + "\n" + "\n".join(indent + ln for ln in lines), selector)
        if not _does_something(source):  # prose that happens to parse ("server-server-server") is not a body
            raise code_policy.PolicyViolation("the reply is neither a method nor a method body") from None
        return source


def _does_something(source: str) -> bool:
    """True when the function body holds a statement other than bare expressions (a docstring, `a - b`)."""
    func = ast.parse(source).body[0]
    if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):  # extract_method_source returned a def
        return False
    return any(not isinstance(stmt, ast.Expr) or isinstance(stmt.value, ast.Call) for stmt in func.body)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SLOT_PROMPT_CHARS else text[:SLOT_PROMPT_CHARS] + "..."


@dataclass
class Trial:
    """One BRICK attempt: the prompt, the reply, the method cut out of it, and its sandbox run."""

    attempt: int
    prompt: str
    raw: str
    source: str | None = None
    result: sandbox.SandboxResult | None = None
    problem: str = ""  # why it was not accepted; "" when it was


def acceptance_problem(result: sandbox.SandboxResult, call: str) -> str:
    """Why a trial run does not earn SUCCESS ("" when it does): it must run on the call's own arguments
    without error, and do something -- return a value, change a slot or print."""
    if not result.ok:
        last = (result.traceback or "").strip().splitlines()[-1:] or [""]
        where = f" ({last[0]})" if last[0] and last[0] not in (result.error or "") else ""
        return f"running obj.{call} failed ({result.error_kind}): {result.error}{where}"
    if result.value is None and not result.slot_updates and not result.deleted_slots and not result.stdout.strip():
        return f"obj.{call} returned None and changed nothing: compute and return the result"
    return ""


def ignored_arguments(source: str, args: list[Any], kwargs: dict[str, Any]) -> list[str]:
    """Parameters that receive one of the call's arguments but are never read in the body (parse only).

    A method that ignores what it was called with cannot compute anything from it: a 135M BRICK's usual
    nonsense (``def word_count(self, arg1): return self.count + 1``) runs cleanly and would be persisted."""
    func = ast.parse(source).body[0]
    assert isinstance(func, ast.FunctionDef)
    positional = [a.arg for a in (*func.args.posonlyargs, *func.args.args)][1:]
    if func.args.vararg is not None and len(args) > len(positional):
        return []  # *rest takes the surplus: it is read or not as a whole
    named = {*positional, *(a.arg for a in func.args.kwonlyargs)}
    given = positional[:len(args)] + [k for k in kwargs if k in named]
    if func.args.kwarg is not None:
        given += [k for k in kwargs if k not in given]
    read = {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    if func.args.kwarg is not None and func.args.kwarg.arg in read:
        read |= set(kwargs)
    return [name for name in dict.fromkeys(given) if name not in read]


Generate = Callable[[str], Awaitable[str]]
RunTrial = Callable[[str], Awaitable[sandbox.SandboxResult]]


async def write_method(generate: Generate, trial: RunTrial, rec: Receiver, selector: str, args: list[Any],
                       kwargs: dict[str, Any], chunks: list[Any], *, attempts: int,
                       on_refused: Callable[[Trial], Awaitable[None]] | None = None) -> list[Trial]:
    """BRICK writes, the policy checks, the sandbox runs it on the call's arguments; a refused attempt is
    re-asked with the reason (and the refused code) until ``attempts`` are spent. The last Trial decides:
    accepted when its ``problem`` is empty. Shared by the kernel's cycle and bench/dnu.py."""
    call = render_call(selector, args, kwargs)
    trials: list[Trial] = []
    for attempt in range(1, attempts + 1):
        previous = trials[-1] if trials else None
        prompt = brick_prompt(rec, selector, call, args, kwargs, chunks,
                              previous.problem if previous else "", previous.source if previous else None)
        t = Trial(attempt, prompt, await generate(prompt))
        trials.append(t)
        try:
            t.source = code_policy.validate_method_source(
                extract(t.raw, selector, signature_hint(selector, args, kwargs)), selector).source
        except code_policy.PolicyViolation as e:
            t.problem = e.reason if e.lineno is None else f"line {e.lineno}: {e.reason}"
        else:
            ignored = ignored_arguments(t.source, args, kwargs)
            if ignored:
                t.problem = (f"the method never reads its argument{'s' * (len(ignored) > 1)} {', '.join(ignored)}: "
                             f"obj.{call} must compute its result from them")
                if on_refused is not None:
                    await on_refused(t)
                continue
            t.result = await trial(t.source)
            t.problem = acceptance_problem(t.result, call)
        if not t.problem:
            break
        if on_refused is not None:
            await on_refused(t)
    return trials


async def _sandboxed(run: CycleRun, rec: Receiver, source: str, selector: str, args: list[Any],
                     kwargs: dict[str, Any], *, raise_on_failure: bool = True) -> sandbox.SandboxResult:
    settings = run.env.settings
    cancel = threading.Event()
    try:
        result = await asyncio.get_running_loop().run_in_executor(None, lambda: sandbox.run_method(
            source, selector, rec.slots, args, kwargs, timeout_s=settings.sandbox_timeout,
            memory_mb=settings.sandbox_memory_mb, methods=rec.methods, cancel=cancel))
    except asyncio.CancelledError:
        cancel.set()  # the thread kills the sandboxed process and returns
        raise
    except sandbox.SandboxUnavailable as e:
        raise ServiceError(ErrorCode.UNAVAILABLE, f"no sandbox on this host, so the method was not run: {e}") from None
    except ValueError as e:
        raise ServiceError(ErrorCode.BAD_ARGS, f"cannot run #{selector}: {e}") from None
    await run.emit("log", text=f"sandbox: {'returned' if result.ok else 'failed'} in {result.elapsed_s:.2f} s")
    if result.stdout:
        await run.emit("log", text=f"method printed: {result.stdout[:2000]}")
    if not result.ok and raise_on_failure:
        code = ErrorCode.REJECTED if result.error_kind == "policy" else ErrorCode.SANDBOX
        raise ServiceError(code, f"#{selector} failed in the sandbox ({result.error_kind}): {result.error}",
                           {"traceback": result.traceback or "", "stderr": result.stderr[-2000:]})
    return result


async def _finish(run: CycleRun, selector: str, rec: Receiver, result: sandbox.SandboxResult,
                  source: str | None) -> dict[str, Any]:
    """One transaction: store a generated method (if any), write back slot updates, complete the cycle."""
    meta = {"cycle_id": run.cycle_id, "generated_by": "BRICK"} if source else {}
    out = await run.env.image.transact(_store, run.cycle_id, run.target_oid, selector, source, meta,
                                       result.slot_updates, list(result.deleted_slots), rec.plain, set(rec.slots))
    await run.completed("SUCCESS", output=source if source else result.value)
    if out["skipped"]:
        await run.note(f"slot updates not written back (values were copies of non-plain data): {out['skipped']}")
    return out


def _store(root: Root, conn: Any, cycle_id: str, target_oid: str, selector: str, source: str | None,
           meta: dict[str, Any], updates: dict[str, Any], deleted: list[str], plain: set[str],
           known: set[str]) -> dict[str, Any]:
    """The COMPLETE transaction of a send or define (see the module docstring for what is written back)."""
    obj = records.resolve_target(root, conn, target_oid)
    version = None
    if source is not None:
        version = obj.define_method(selector, source, **meta).version
    written, skipped = [], []
    for name, value in updates.items():
        if name in known and name not in plain:
            skipped.append(name)
            continue
        try:
            obj.set_slot(name, value)
            written.append(name)
        except ValueError:
            skipped.append(name)
    for name in deleted:
        if obj.has_slot(name) and name in plain:
            obj.del_slot(name)
            written.append(name)
        else:
            skipped.append(name)
    records.transition(root, conn, cycle_id, State.COMPLETE.value, "SUCCESS",
                       {"status": "SUCCESS", "result": {"selector": selector, "version": version, "slots": written}})
    return {"version": version, "slots": written, "skipped": skipped}


async def _dnu_outcome(run: CycleRun, rec: Receiver, selector: str, status: str, *, source: str | None,
                       prompt: str, error: str | None = None, result: Any = None, raw: str | None = None) -> None:
    state = run.state or State.IDLE.value
    await run.record("DNU_OUTCOME", lambda: AuditEvent.dnu_outcome(
        run.cycle_id, state, persona="BRICK", receiver_oid=rec.oid, selector=selector, status=status,
        source=source, error=error, mission_type=run.mission_type or None, llm_prompt=prompt,
        mission_brief=run.mission.get("mission_brief", run.mission), result=sandbox.to_jsonable(result),
        llm_response_raw=raw))
