"""Issue 13, item 4, in the engine: an embedding batch on a generative model does not keep the
model from the steps of running streams.

FairLock serves waiting threads in order (a thread that releases it and takes it again at once
goes after one already waiting); while generation requests are in flight, cache-free forwards
are cut to about INTERLEAVE_SECONDS each, and give the same embeddings.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lepton.engine import tasks
from lepton.engine.engine import Engine
from lepton.engine.fair_lock import FairLock
from lepton.sampling_params import SamplingParams
from tests.engine import checkpoint


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_a_waiting_thread_goes_before_the_holder_takes_the_lock_again():
    lock, order = FairLock(), []
    lock.acquire()

    def waiter():
        with lock:
            order.append("waiter")

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    wait_until(lambda: lock._next_ticket == 2)   # tickets 0 (ours) and 1 (the waiter's): it is queued
    lock.release()
    with lock:                                   # at once, as an embedding batch's next forward would
        order.append("holder")
    thread.join(10)
    assert order == ["waiter", "holder"]


def test_waiters_are_served_in_arrival_order():
    lock, order = FairLock(), []
    lock.acquire()
    threads = []
    for i in range(5):
        threads.append(threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release()),
                                        daemon=True))
        threads[-1].start()
        wait_until(lambda i=i: lock._next_ticket == i + 2)   # queued before the next one starts
    lock.release()
    for thread in threads:
        thread.join(10)
    assert order == [0, 1, 2, 3, 4]


def test_the_lock_is_reentrant_and_only_its_holder_releases_it():
    lock = FairLock()
    with lock, lock:   # as RLock: the engine's step() runs step_routed() under the same lock
        pass
    got = []
    thread = threading.Thread(target=lambda: (lock.acquire(), got.append(1), lock.release()), daemon=True)
    thread.start()
    thread.join(10)
    assert got == [1]    # released twice: free again
    with pytest.raises(RuntimeError):
        lock.release()


def test_a_waiter_that_gives_up_does_not_block_the_queue(monkeypatch):
    """A waiter interrupted (KeyboardInterrupt in a Condition wait) leaves; the next ticket is served."""
    lock = FairLock()
    lock.acquire()
    original_wait = lock._cond.wait
    interrupted = []

    def wait(*args):
        if threading.current_thread().name == "quitter" and not interrupted:
            interrupted.append(True)
            raise KeyboardInterrupt
        return original_wait(*args)

    monkeypatch.setattr(lock._cond, "wait", wait)
    outcome = []

    def quitter():
        try:
            lock.acquire()
        except KeyboardInterrupt:
            outcome.append("gave up")

    first = threading.Thread(target=quitter, name="quitter", daemon=True)
    first.start()
    first.join(10)
    second = threading.Thread(target=lambda: (lock.acquire(), outcome.append("served"), lock.release()),
                              daemon=True)
    second.start()
    wait_until(lambda: lock._next_ticket == 3)   # ours, the quitter's (abandoned), the second's
    lock.release()
    second.join(10)
    assert outcome == ["gave up", "served"]


# ---- cache-free forwards while generation runs ------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine(checkpoint(tmp_path_factory, "llama"), device="cpu", max_model_len=128)


def add(engine, request_id: str, params: SamplingParams) -> None:
    """A generation request whose outputs go nowhere (as a stream's would go to its client)."""
    engine.add_processed(engine.input_processor.process(request_id, "Hello", params), lambda out: None)


def forwards(engine, monkeypatch) -> list[int]:
    """Record the number of inputs of each cache-free forward."""
    sizes = []
    encode = engine.executor.encode

    def counting(input_ids, *args, **kwargs):
        sizes.append(len(input_ids))
        return encode(input_ids, *args, **kwargs)

    monkeypatch.setattr(engine.executor, "encode", counting)
    return sizes


def test_embedding_forwards_are_short_while_generation_runs(engine, monkeypatch):
    texts = [f"input {i}: the quick brown fox jumps over the lazy dog" for i in range(6)]
    sizes = forwards(engine, monkeypatch)
    alone = engine.embed(texts)
    assert sizes == [6]                      # idle engine: one forward within the token budget
    add(engine, "busy", SamplingParams(max_tokens=4))
    try:
        monkeypatch.setattr(tasks, "INTERLEAVE_SECONDS", 0.0)   # any measured speed: one input each
        sizes.clear()
        interleaved = engine.embed(texts)
    finally:
        engine.abort("busy")
    assert sizes == [1] * 6
    torch.testing.assert_close(interleaved, alone, rtol=1e-5, atol=1e-5)


def test_the_forward_budget_follows_the_measured_speed(engine, monkeypatch):
    runner = engine.tasks
    monkeypatch.setattr(runner, "busy", lambda: True)
    monkeypatch.setattr(runner, "_seconds_per_token", None)
    assert runner._budget() == 1                                  # unmeasured: one input
    runner._seconds_per_token = tasks.INTERLEAVE_SECONDS / 100    # 100 tokens fit the target
    assert runner._budget() == 100
    runner._seconds_per_token = 1e-12                             # never past the engine's own budget
    assert runner._budget() == runner.max_num_batched_tokens
    monkeypatch.setattr(runner, "busy", lambda: False)
    runner._seconds_per_token = 1.0
    assert runner._budget() == runner.max_num_batched_tokens     # nothing to interleave with


def test_a_step_that_waits_for_the_model_runs_before_the_next_forward_of_a_batch(engine, monkeypatch):
    """During each forward of an embedding batch, a step asks for the model (as the engine loop
    does while streams run): it runs before the batch's next forward, every time."""
    events, lock = [], engine._lock
    encode, step = engine.executor.encode, engine.core.step
    steppers = []

    def forward(*args, **kwargs):
        events.append("forward")   # under the lock, as the step's event below
        tickets = lock._next_ticket
        steppers.append(threading.Thread(target=engine.step_routed, daemon=True))
        steppers[-1].start()
        wait_until(lambda: lock._next_ticket > tickets)   # the step is queued for the lock
        return encode(*args, **kwargs)

    monkeypatch.setattr(engine.executor, "encode", forward)
    monkeypatch.setattr(engine.core, "step", lambda *a, **k: (events.append("step"), step(*a, **k))[1])
    monkeypatch.setattr(engine.tasks, "busy", lambda: True)
    monkeypatch.setattr(tasks, "INTERLEAVE_SECONDS", 0.0)   # one input per forward
    engine.embed([f"text {i} " * 8 for i in range(6)])
    for thread in steppers:
        thread.join(30)
    assert events == ["forward", "step"] * 6
