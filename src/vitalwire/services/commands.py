"""Commands from clinicians to devices: validated, role-gated, idempotent, queued, tracked.

How it works: :meth:`CommandService.send` validates the command against the catalogue
(core/commands.py), checks the role, resolves the patient's device, and commits the command as
``queued`` (the store row, a ``command`` event in the patient's stream and an audit record in one
transaction) before anything goes to the device. If the device is connected it is sent at once;
otherwise it waits, persisted, and is delivered in order when the device says hello again — unless
its time to live passed first (``expired``). Device answers (``command_result``) move it along the
lifecycle table; a sent command with no final answer within its timeout is ``timed_out``. Every
change is an event in the patient's stream and is also pushed to the requester's connection, even
when it is not subscribed to that patient. After a restart, commands sent but never answered are
re-queued if idempotent, else ``timed_out`` — never shown as delivered when they were not.

A command changes state only together with its event: the new state's event and row are built
first, and if that fails (a value that cannot be encoded) the command stays as it was and takes no
offset; a device's answer is bounded when decoded (wire.py), so its ``data`` cannot cause that.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from vitalwire.core import access as policy
from vitalwire.core import commands as cc
from vitalwire.core import events as ev
from vitalwire.core.errors import Conflict, Forbidden, InvalidMessage, NotFound
from vitalwire.services.access import Access
from vitalwire.services.auth import Principal
from vitalwire.services.ingest import DeviceSession, Ingest
from vitalwire.services.streams import Streams
from vitalwire.services.writer import BatchWriter
from vitalwire.store import AuditRow, CommandRow, Store
from vitalwire.wire import Command, CommandResult, Event, SendCommand, encode_text

log = logging.getLogger("vitalwire.commands")

_RESULT_EVENTS = {"acknowledged": "device_ack", "completed": "device_done", "failed": "device_fail"}


class Watcher(Protocol):
    def push_direct(self, event: Event) -> None: ...


@dataclass(slots=True)
class CommandState:
    command_id: str
    patient_id: str
    device_id: str
    name: str
    args: dict[str, Any]
    status: str
    requested_by: str
    idempotency_key: str | None
    created_at: float
    ttl_s: float
    timeout_s: float
    sent_at: float | None = None
    updated_at: float = 0.0
    message: str | None = None
    result: dict[str, Any] | None = None
    watchers: list[Watcher] = field(default_factory=list)

    def data(self) -> dict[str, Any]:
        return {
            "command_id": self.command_id,
            "name": self.name,
            "args": self.args,
            "device": self.device_id,
            "patient_id": self.patient_id,
            "status": self.status,
            "requested_by": self.requested_by,
            "at": self.updated_at,
            "message": self.message,
            "result": self.result,
        }

    def row(self) -> CommandRow:
        return CommandRow(
            self.command_id,
            self.patient_id,
            self.device_id,
            self.name,
            json.dumps(self.args),
            self.status,
            self.requested_by,
            self.idempotency_key,
            self.created_at,
            self.ttl_s,
            self.timeout_s,
            self.sent_at,
            self.updated_at,
            self.message,
            None if self.result is None else json.dumps(self.result),
        )


class CommandService:
    def __init__(
        self,
        store: Store,
        streams: Streams,
        writer: BatchWriter,
        ingest: Ingest,
        clock: Callable[[], float],
        authorize: Callable[[Principal, str, cc.CommandSpec], None] | None = None,
    ) -> None:
        self.store = store
        self.streams = streams
        self.writer = writer
        self.ingest = ingest
        self.clock = clock
        #: Access hook: raises Forbidden unless this principal may send this command to this
        #: patient (care teams; reset and silence need the patient in the user's care)
        self.authorize = authorize or _deny_all
        self._open: dict[str, CommandState] = {}
        #: (requester, idempotency key) -> the command, kept for its TTL even once finished
        self._keyed: dict[tuple[str, str], CommandState] = {}
        self.settled: Counter[str] = Counter()  # commands by final state (/metrics)
        #: On a cloud: the edge nodes that own some patients; their commands go down to the
        #: edge, which queues and delivers them (services/edges.py)
        self.remote: Any = None

    # -- start-up -------------------------------------------------------------------------------

    async def load(self) -> None:
        """Reload commands that were not finished; resolve the ones caught mid-flight honestly."""
        await self._restore(await self.store.open_commands(), "server restarted")

    async def take_over(self, pid: str) -> None:
        """This node now writes ``pid``'s stream (services/cluster.py): the patient's open
        commands as the store has them. One the previous node had sent and not seen answered
        is re-queued if idempotent, else timed out (the device may or may not have run it)."""
        self.let_go(pid)
        await self._restore(await self.store.open_commands(pid), "the patient's node changed")

    def let_go(self, pid: str) -> None:
        """Another node writes ``pid``'s stream now: it holds the patient's open commands."""
        for cid, st in list(self._open.items()):
            if st.patient_id == pid:
                del self._open[cid]
                if st.idempotency_key:
                    self._keyed.pop((st.requested_by, st.idempotency_key), None)

    async def _restore(self, open_rows: list[dict[str, Any]], why: str) -> None:
        events: list[Event] = []
        rows: list[CommandRow] = []
        now = self.clock()
        for r in open_rows:
            st = CommandState(
                r["command_id"],
                r["patient_id"],
                r["device_id"],
                r["name"],
                json.loads(r["args"]),
                r["status"],
                r["requested_by"],
                r["idempotency_key"],
                r["created_at"],
                r["ttl_s"],
                r["timeout_s"],
                r["sent_at"],
                r["updated_at"],
                r["message"],
                None if r["result"] is None else json.loads(r["result"]),
            )
            self._open[st.command_id] = st
            if st.idempotency_key:
                self._keyed[(st.requested_by, st.idempotency_key)] = st
            if st.status in (cc.SENT, cc.ACKNOWLEDGED):
                if cc.CATALOGUE[st.name].idempotent and st.status == cc.SENT:
                    self._try_move(
                        st,
                        "requeue",
                        now,
                        f"{why} before the device answered; re-queued (idempotent)",
                        events,
                        rows,
                    )
                else:
                    self._try_move(
                        st, "timeout", now, f"{why} before the device answered", events, rows
                    )
        if rows:
            await self.writer.commit(events, commands=rows)

    # -- requests -----------------------------------------------------------------------------

    async def send(
        self, who: Principal, req: SendCommand, watcher: Watcher | None, origin: str | None = None
    ) -> dict[str, Any]:
        """Validate, authorise and queue a command; return its state once durable."""
        args = cc.validate(req.name, req.args)
        spec = cc.CATALOGUE[req.name]
        ttl = cc.check_window("ttl_s", req.ttl_s, cc.DEFAULT_TTL_S, cc.TTL_BOUNDS)
        # a command that works for a window (request_data) answers when the window ends
        window = float(args.get("duration_s", 0.0)) if req.name == "request_data" else 0.0
        timeout = cc.check_window(
            "timeout_s", req.timeout_s, max(cc.DEFAULT_TIMEOUT_S, window + 15.0), cc.TIMEOUT_BOUNDS
        )
        if req.idempotency_key is not None and not 1 <= len(req.idempotency_key) <= 128:
            raise InvalidMessage(
                "idempotency_key must be 1 to 128 characters", field="idempotency_key"
            )
        ev.check_id("patient_id", req.patient_id)
        self.authorize(who, req.patient_id, spec)
        if (
            self.remote is not None
            and (node := await self.remote.route(req.patient_id)) is not None
        ):
            # an edge node's patient: its edge queues and delivers it (services/edges.py)
            body = msgspec.to_builtins(req)
            body.pop("id", None)
            return await self.remote.call(  # type: ignore[no-any-return]
                node, "command", who, req.patient_id, body, origin, watcher
            )
        now = self.clock()
        if req.idempotency_key is not None:
            existing = self._by_key(who.name, req.idempotency_key, now)
            if existing is not None:
                if watcher is not None and watcher not in existing.watchers:
                    existing.watchers.append(watcher)
                return self._reply(existing)
        device_id = await self._device_for(req.patient_id, req.device_id)
        st = CommandState(
            "cmd-" + secrets.token_hex(8),
            req.patient_id,
            device_id,
            req.name,
            args,
            cc.QUEUED,
            who.name,
            req.idempotency_key,
            now,
            ttl,
            timeout,
            updated_at=now,
        )
        row = st.row()  # first: a command whose row or event cannot be built is not taken
        event = self._event(st)
        if watcher is not None:
            st.watchers.append(watcher)
        self._open[st.command_id] = st
        if st.idempotency_key:
            self._keyed[(who.name, st.idempotency_key)] = st
        detail = {"command_id": st.command_id, "name": st.name, "args": args, "device": device_id}
        audit = AuditRow(now, who.name, "command", st.patient_id, json.dumps(detail), origin)
        await self.writer.commit([event], commands=[row], audit=[audit])
        queued = self._reply(st)  # the reply says queued; sent and later come as status events
        self._notify(st, [event])
        self.deliver(device_id)
        return queued

    def _reply(self, st: CommandState) -> dict[str, Any]:
        """The command for the requester: its state, whether its device is connected here (if
        not, a queued command waits for it) and when it expires if never delivered."""
        connected = st.device_id in self.ingest.sessions
        return {**st.data(), "device_connected": connected, "expires_at": st.created_at + st.ttl_s}

    def _by_key(self, requester: str, key: str, now: float) -> CommandState | None:
        """The command sent with this key by this requester within its TTL — finished or not."""
        for k in [k for k, st in self._keyed.items() if now > st.created_at + st.ttl_s]:
            del self._keyed[k]  # past their TTL: a new command may use the key
        return self._keyed.get((requester, key))

    async def _device_for(self, pid: str, device_id: str | None) -> str:
        patient = await self.store.get_patient(pid)
        if patient is None:
            raise NotFound(f"patient {pid} does not exist", field="patient_id")
        bound: list[str] = patient["devices"]
        if device_id is not None:
            if device_id not in bound:
                raise Conflict(
                    f"device {device_id} is not bound to patient {pid}", field="device_id"
                )
            return device_id
        if len(bound) != 1:
            raise InvalidMessage(
                f"device_id is required: patient {pid} has {len(bound)} bound devices",
                field="device_id",
            )
        return bound[0]

    # -- device side ----------------------------------------------------------------------------

    def deliver(self, device_id: str) -> None:
        """Send the device's queued commands, oldest first, if it is connected."""
        session = self.ingest.sessions.get(device_id)
        if session is None:
            return
        now = self.clock()
        events: list[Event] = []
        rows: list[CommandRow] = []
        moved: list[tuple[CommandState, Event]] = []
        queued = sorted(
            (s for s in self._open.values() if s.device_id == device_id and s.status == cc.QUEUED),
            key=lambda s: s.created_at,
        )
        for st in queued:
            if now > st.created_at + st.ttl_s:
                ok = self._try_move(
                    st, "expire", now, "time to live passed before delivery", events, rows
                )
            else:
                frame = encode_text(Command(st.command_id, st.name, st.args, st.timeout_s))
                ok = self._try_move(st, "deliver", now, None, events, rows)
                if ok:
                    session.send(frame)
            if ok:
                moved.append((st, events[-1]))
        self._submit(events, rows, moved)

    def on_result(self, session: DeviceSession, msg: CommandResult) -> None:
        """A device answered. Raises NotFound for a command it was never sent."""
        st = self._open.get(msg.command_id)
        if st is None or st.device_id != session.device_id:
            raise NotFound(
                f"command {msg.command_id} is not open for this device", field="command_id"
            )
        step = _RESULT_EVENTS.get(msg.status)
        if step is None:
            raise InvalidMessage(
                f"status must be one of acknowledged, completed, failed, got {msg.status!r:.40}",
                field="status",
            )
        try:
            cc.transition(st.status, step)
        except cc.IllegalTransition:
            log.info("ignoring %s for command %s in state %s", msg.status, st.command_id, st.status)
            return
        events: list[Event] = []
        rows: list[CommandRow] = []
        self._move(st, step, self.clock(), msg.message, events, rows, result=msg.data)
        self._submit(events, rows, [(st, events[-1])])

    def tick(self) -> int:
        """Expire queued commands past their TTL; time out sent ones past their timeout."""
        now = self.clock()
        events: list[Event] = []
        rows: list[CommandRow] = []
        moved: list[tuple[CommandState, Event]] = []
        for st in list(self._open.values()):
            if st.status == cc.QUEUED and now > st.created_at + st.ttl_s:
                step, why = "expire", "time to live passed before delivery"
            elif (
                st.status in (cc.SENT, cc.ACKNOWLEDGED)
                and st.sent_at is not None
                and now > st.sent_at + st.timeout_s
            ):
                step, why = "timeout", f"no answer within {st.timeout_s:g} s"
            else:
                continue
            if self._try_move(st, step, now, why, events, rows):
                moved.append((st, events[-1]))
        self._submit(events, rows, moved)
        return len(moved)

    # -- helpers --------------------------------------------------------------------------------

    def _move(
        self,
        st: CommandState,
        step: str,
        now: float,
        message: str | None,
        events: list[Event],
        rows: list[CommandRow],
        *,
        result: dict[str, Any] | None = None,
    ) -> None:
        """Move ``st`` on by ``step``, appending its event and row; ``result``: the device's data.

        All or nothing: the event (which takes the stream's next offset) and the row are built
        from the new state before it is kept; if either fails, ``st`` is left as it was."""
        before = (st.status, st.updated_at, st.message, st.sent_at, st.result)
        st.status = cc.transition(st.status, step)
        st.updated_at = now
        st.message = message
        if step == "deliver":
            st.sent_at = now
        elif step == "requeue":
            st.sent_at = None
        if result is not None:
            st.result = result
        try:
            row = st.row()
            event = self._event(st)  # last: it takes the offset only if it is built
        except BaseException:
            st.status, st.updated_at, st.message, st.sent_at, st.result = before
            raise
        events.append(event)
        rows.append(row)
        if st.status in cc.TERMINAL:
            self._open.pop(st.command_id, None)
            self.settled[st.status] += 1

    def _try_move(
        self,
        st: CommandState,
        step: str,
        now: float,
        message: str | None,
        events: list[Event],
        rows: list[CommandRow],
    ) -> bool:
        """:meth:`_move` for one of several commands moved together: one that fails is logged
        and left as it was, and the others still move."""
        try:
            self._move(st, step, now, message, events, rows)
        except Exception:
            log.exception(
                "command %s could not move on (%s); left %s", st.command_id, step, st.status
            )
            return False
        return True

    def _event(self, st: CommandState) -> Event:
        return self.streams.new_event(
            ev.patient_stream(st.patient_id), ev.COMMAND, st.updated_at, st.data()
        )

    def _submit(
        self,
        events: list[Event],
        rows: list[CommandRow],
        moved: list[tuple[CommandState, Event]],
    ) -> None:
        if not events:
            return
        audit = [
            AuditRow(
                st.updated_at,
                st.requested_by,
                "command_outcome",
                st.patient_id,
                json.dumps(
                    {
                        "command_id": st.command_id,
                        "name": st.name,
                        "device": st.device_id,
                        "status": st.status,
                        "message": st.message,
                    }
                ),
            )
            for st, _ in moved
            if st.status in cc.TERMINAL
        ]

        def durable() -> None:
            for st, event in moved:
                self._notify(st, [event])

        self.writer.submit([], events, durable, commands=rows, audit=audit)

    def _notify(self, st: CommandState, events: list[Event]) -> None:
        for watcher in st.watchers:
            for e in events:
                watcher.push_direct(e)


#: The statuses a command can be in (the lifecycle table of core/commands.py).
STATUSES = (
    "queued",
    "sent",
    "acknowledged",
    "completed",
    "failed",
    "expired",
    "timed_out",
)
#: The most transitions one command's lifecycle reads (a command has a handful).
MAX_TRANSITIONS = 100


def _command_out(row: dict[str, Any]) -> dict[str, Any]:
    """A command row as the API gives it (args and result decoded)."""
    out = dict(row)
    for key in ("args", "result"):
        value = out.get(key)
        if isinstance(value, str):
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = None
    return out


async def list_commands(
    store: Store,
    access: Access,
    who: Principal,
    filters: dict[str, Any],
    after: tuple[float, str] | None,
    limit: int,
    origin: str | None = None,
) -> list[dict[str, Any]]:
    """Commands of the patients ``who`` may VIEW, newest first (store ``list_commands``).

    ``filters``: ``patient`` (one patient: 404 unknown, 403 out of care, audited, as the alerts
    list), ``device``, ``status`` (one of :data:`STATUSES`), ``since``/``until`` (created_at).
    Audited ``list_commands``."""
    status = filters.get("status")
    if status is not None and status not in STATUSES:
        raise InvalidMessage(f"status must be one of {', '.join(STATUSES)}", field="status")
    query = {k: v for k, v in filters.items() if k != "patient"}
    pid = filters.get("patient")
    if pid is not None:
        ev.check_id("patient", pid)
        if await store.get_patient(pid) is None:
            raise NotFound(f"patient {pid} does not exist", field="patient")
        try:
            access.check(who, policy.VIEW, pid)
        except Forbidden as exc:
            access.refused(who.name, "list_commands", pid, exc.message, origin)
            raise
        query["patients"] = [pid]
    else:
        every = [p["id"] for p in await store.list_patients()]
        seen = [p for p in every if access.allowed(who, policy.VIEW, p)]
        query["patients"] = None if len(seen) == len(every) else seen
    rows = [_command_out(r) for r in await store.list_commands(query, after, limit)]
    detail: dict[str, Any] = {"count": len(rows)}
    detail.update({k: v for k, v in filters.items() if v is not None and k != "patient"})
    access.audit(who.name, "list_commands", pid, detail, origin)
    return rows


async def command_lifecycle(
    store: Store, access: Access, who: Principal, command_id: str, origin: str | None = None
) -> dict[str, Any]:
    """One command's state and every status it went through, with timestamps: the ``command``
    events of its patient's stream between its creation and its last change (one range scan of
    the (stream, kind, ts) index), filtered by ``command_id``. NotFound for an unknown command;
    a patient the user may not VIEW is 403 (audited) as elsewhere. Audited ``read_command``."""
    if len(command_id) > 64:
        raise InvalidMessage("command_id must be at most 64 characters", field="command_id")
    row = await store.get_command(command_id)
    if row is None:
        raise NotFound(f"command {command_id} does not exist", field="command_id")
    pid = row["patient_id"]
    try:
        access.check(who, policy.VIEW, pid)
    except Forbidden as exc:
        access.refused(who.name, "read_command", pid, exc.message, origin, command_id=command_id)
        raise
    events = await store.events_of_kind_between(
        ev.patient_stream(pid), ev.COMMAND, row["created_at"], row["updated_at"], MAX_TRANSITIONS
    )
    lifecycle = [
        {
            "status": e.data.get("status"),
            "at": e.data.get("at", e.ts),
            "offset": e.offset,
            "message": e.data.get("message"),
        }
        for e in events
        if e.data.get("command_id") == command_id
    ]
    access.audit(who.name, "read_command", pid, {"command_id": command_id}, origin)
    return {"command": _command_out(row), "lifecycle": lifecycle}


def _deny_all(who: Principal, pid: str, spec: cc.CommandSpec) -> None:
    """Without access control wired in, nobody may command a device (fail closed)."""
    raise Forbidden("no access control configured", field="role")
