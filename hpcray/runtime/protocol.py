"""Framed messages between a node manager and its local clients over Unix socketpairs.

A message is a pickled tuple `(kind, ...)`, framed by a 4-byte little-endian length.
Workers use `BlockingConnection` (a worker has nothing else to do while it waits);
the node manager uses `NonBlockingConnection`, whose sends never block its event loop:
what the kernel does not take now is kept and flushed when the socket is writable, so a
slow worker can never wedge the node.
"""

from __future__ import annotations

import collections
import pickle
import socket
import struct
import threading

_FRAME = struct.Struct("<I")
_SOCKET_BUFFER = 4 * 1024 * 1024


def encode(message) -> bytes:
    data = pickle.dumps(message, protocol=5)
    return _FRAME.pack(len(data)) + data


def decode(frame: bytes):
    """The message of one whole frame (a SEQPACKET socket keeps frames apart)."""
    return pickle.loads(frame[_FRAME.size:])


def tune(sock: socket.socket) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        except OSError:
            pass


class BlockingConnection:
    """A worker's end: blocking receive (or `recv_nowait`), thread-safe send.

    Received bytes wait in `_inbox` from `_pos` on: messages are read where they lie and
    the buffer is compacted once it is all read, not per message (an actor's pipelined
    calls arrive by the hundred in one receive)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._inbox = bytearray()
        self._pos = 0
        self._send_lock = threading.Lock()

    def send(self, message) -> None:
        data = encode(message)
        with self._send_lock:
            self.sock.sendall(data)

    def buffered(self) -> bool:
        """Whether bytes of a next message were received already (recv may not wait)."""
        return len(self._inbox) > self._pos

    def recv(self):
        """The next message; EOFError when the peer is gone."""
        if not self._inbox:  # the usual case: one whole message per receive, no copy
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("node manager closed the connection")
            if len(chunk) >= 4 and _FRAME.unpack_from(chunk, 0)[0] + 4 == len(chunk):
                return pickle.loads(memoryview(chunk)[4:])
            self._inbox += chunk
        while True:
            message = self._take()
            if message is not _NOTHING:
                return message
            self._fill(0)

    def recv_nowait(self):
        """The next message if one has arrived, else None (never waits)."""
        message = self._take()
        if message is _NOTHING:
            try:
                self._fill(socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            message = self._take()
        return None if message is _NOTHING else message

    def _take(self):
        inbox, pos = self._inbox, self._pos
        if len(inbox) - pos < 4:
            return _NOTHING
        (size,) = _FRAME.unpack_from(inbox, pos)
        end = pos + 4 + size
        if len(inbox) < end:
            return _NOTHING
        with memoryview(inbox) as view:
            message = pickle.loads(view[pos + 4:end])
        if end == len(inbox):
            inbox.clear()
            self._pos = 0
        else:
            self._pos = end
        return message

    def _fill(self, flags: int) -> None:
        inbox = self._inbox
        if self._pos:  # a partial message waits at the end: move it to the front
            del inbox[:self._pos]
            self._pos = 0
        want = 1 << 16
        if len(inbox) >= 4:  # the rest of a large message in one call
            want = max(want, 4 + _FRAME.unpack_from(inbox, 0)[0] - len(inbox))
        chunk = self.sock.recv(want, flags)
        if not chunk:
            raise EOFError("node manager closed the connection")
        inbox += chunk

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


_NOTHING = object()


# What a NonBlockingConnection receives lands here first: a fresh 1 MiB bytes per
# receive cost three system calls (mmap, mremap, munmap) per message, measured.
_RECEIVE_BYTES = 1 << 20
_receive_buffer = bytearray(_RECEIVE_BYTES)
_receive_view = memoryview(_receive_buffer)
_receive_lock = threading.Lock()


class NonBlockingConnection:
    """The node manager's end: `receive_ready` parses what arrived, `send` never blocks."""

    __slots__ = ("sock", "_inbox", "_outbox", "closed")

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self._inbox = bytearray()
        self._outbox: collections.deque = collections.deque()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def receive_ready(self) -> list:
        """Messages complete so far; raises EOFError when the peer closed."""
        inbox = self._inbox
        with _receive_lock:
            while True:
                try:
                    received = self.sock.recv_into(_receive_buffer)
                except (BlockingIOError, InterruptedError):
                    break
                except ConnectionResetError:
                    received = 0
                if not received:
                    self.closed = True
                    break
                inbox += _receive_view[:received]
                if received < _RECEIVE_BYTES:
                    break
        messages = []
        pos = 0
        end = len(inbox)
        while end - pos >= 4:
            (size,) = _FRAME.unpack_from(inbox, pos)
            if end - pos - 4 < size:
                break
            messages.append(pickle.loads(memoryview(inbox)[pos + 4:pos + 4 + size]))
            pos += 4 + size
        if pos:
            del inbox[:pos]
        if self.closed and not messages:
            raise EOFError
        return messages

    def send(self, message) -> bool:
        """Queue and try to send; True while bytes remain queued (wait for writable)."""
        return self.send_raw(encode(message))

    def send_raw(self, data: bytes) -> bool:
        if self.closed:
            return False
        outbox = self._outbox
        if outbox:
            outbox.append(data)
            return True
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            return False
        if sent < len(data):
            outbox.append(memoryview(data)[sent:])
            return True
        return False

    def flush(self) -> bool:
        """Send what is queued; True while bytes remain."""
        outbox = self._outbox
        while outbox:
            data = outbox[0]
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                return True
            except (BrokenPipeError, ConnectionResetError):
                self.closed = True
                outbox.clear()
                return False
            if sent < len(data):
                outbox[0] = memoryview(data)[sent:]
                return True
            outbox.popleft()
        return False

    @property
    def has_pending_output(self) -> bool:
        return bool(self._outbox)

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass
