"""A test-side reader of event streams, per WHATWG HTML §9.2.6 "Interpreting an event
stream", that also keeps the raw bytes so tests can compare them exactly."""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp


@dataclass
class Event:
    id: str | None
    event: str
    data: str


@dataclass
class StreamReader:
    """Feed bytes, collect events, comments and ``retry`` values."""

    raw: bytearray = field(default_factory=bytearray)
    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    _buffer: bytearray = field(default_factory=bytearray)
    _id: str | None = None
    _event: str = ""
    _data: list[str] = field(default_factory=list)
    _has_id: bool = False

    def feed(self, data: bytes) -> list[Event]:
        """Add bytes; return the events they completed."""
        self.raw += data
        self._buffer += data
        new: list[Event] = []
        while True:
            index = self._buffer.find(b"\n")
            if index < 0:
                return new
            line = self._buffer[:index].decode("utf-8").removesuffix("\r")
            del self._buffer[: index + 1]
            event = self._line(line)
            if event is not None:
                new.append(event)
                self.events.append(event)

    def _line(self, line: str) -> Event | None:
        if line == "":
            if not self._data:
                self._event, self._has_id = "", False
                return None
            event = Event(
                id=self._id if self._has_id else None,
                event=self._event or "message",
                data="\n".join(self._data),
            )
            self._event, self._data, self._has_id = "", [], False
            return event
        if line.startswith(":"):
            self.comments.append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            self._id, self._has_id = value, True
        elif name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "retry" and value.isdigit():
            self.retry = int(value)
        return None


async def read_events(
    response: aiohttp.ClientResponse,
    reader: StreamReader | None = None,
    *,
    until=None,
    limit: int | None = None,
) -> StreamReader:
    """Read ``response`` into ``reader`` until ``until(event)`` is true, ``limit`` events
    have arrived in this call, or the stream ends."""
    reader = reader or StreamReader()
    seen = 0
    async for data in response.content.iter_any():
        for event in reader.feed(data):
            seen += 1
            if (until is not None and until(event)) or (limit is not None and seen >= limit):
                return reader
    return reader


async def read_through(response, reader: StreamReader, offset: int, limit_s: float = 20.0) -> None:
    """Read until an event with id ``offset`` has arrived (or the stream ends)."""
    import asyncio

    while not reader.events or int(reader.events[-1].id or -1) < offset:
        data = await asyncio.wait_for(response.content.readany(), limit_s)
        if not data:
            return
        reader.feed(data)


async def read_quiet(response, reader: StreamReader, quiet_s: float = 0.3) -> None:
    """Read whatever arrives until nothing has for ``quiet_s`` seconds."""
    import asyncio

    while True:
        try:
            data = await asyncio.wait_for(response.content.readany(), quiet_s)
        except TimeoutError:
            return
        if not data:
            return
        reader.feed(data)
