"""``FairLock``: a reentrant lock that serves waiting threads in the order they asked.

The engine's lock serializes everything that runs the model: generation steps (the AsyncEngine
thread) and cache-free forwards (embeddings, classification, from server worker threads).
``threading.RLock`` is not fair: a thread that releases it and takes it again at once (an
embedding batch going from one forward to the next) usually wins over a thread that was already
waiting, so a long batch could starve the steps of every running stream. Here each acquire takes
a ticket and tickets are served in order, so a step waiting for the lock runs before the
batch's next forward.
"""

from __future__ import annotations

import threading


class FairLock:
    """Reentrant, first come first served; ``with lock:`` like threading.RLock."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._next_ticket = 0      # the ticket the next new waiter gets
        self._serving = 0          # the ticket whose holder may take the lock next
        self._abandoned: set[int] = set()   # tickets of waiters that gave up (interrupted)

    def acquire(self) -> bool:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return True
            ticket = self._next_ticket
            self._next_ticket += 1
            try:
                while self._owner is not None or self._serving != ticket:
                    self._cond.wait()
            except BaseException:   # KeyboardInterrupt while waiting: the queue must move on
                self._abandoned.add(ticket)
                self._skip_abandoned()
                self._cond.notify_all()
                raise
            self._owner, self._depth = me, 1
            self._serving += 1
            self._skip_abandoned()
            return True

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release a FairLock that this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def _skip_abandoned(self) -> None:
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1

    def __enter__(self) -> "FairLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
