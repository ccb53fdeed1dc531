"""The suite's ThreadBackend runs clients as threads of one process: what they share there
must be as safe to use at once as it is between Ray's actor processes."""

from __future__ import annotations

import gc
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from flwr.app import Array
from flwr.clientapp import ClientApp

from conftest import ThreadBackend

_THREADS = 4
_LOADS = 1500


class _Finalised:
    """Garbage whose collection runs Python code, where the GIL may pass to another thread."""

    def __del__(self) -> None:
        sum(range(100))


@pytest.fixture
def _threads_switching_often() -> Iterator[None]:
    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(100, 10, 10)
    yield
    sys.setswitchinterval(interval)
    gc.set_threshold(*thresholds)


def _load(array: Array, errors: list[BaseException]) -> None:
    for _ in range(_LOADS):
        for _ in range(20):
            first, second = _Finalised(), _Finalised()
            first.other, second.other = second, first  # type: ignore[attr-defined]
        del first, second
        try:
            array.numpy()
        except BaseException as err:  # noqa: BLE001 - any failure fails the test (3.11: a SystemError)
            errors.append(err)
            return


@pytest.mark.usefixtures("_threads_switching_often")
def test_client_threads_load_arrays_at_once_without_the_interpreter_s_ast_error() -> None:
    backend = ThreadBackend({"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": _THREADS}})
    backend.build(ClientApp)
    array = Array(np.zeros((1,) * 60, dtype=np.float32))  # a long header: many AST nodes to build
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_load, args=(array, errors)) for _ in range(_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"{len(errors)} of {_THREADS} threads failed to load an array: {errors[0]!r}"
