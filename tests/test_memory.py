"""HeapTrimmer: a quiet moment after a burst returns its freed heap to the OS; requests that trickle in alone never
trim."""

from __future__ import annotations

import asyncio
import ctypes
import sys

import pytest

from genrpc.service.memory import HeapTrimmer


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
async def test_trims_once_per_burst_when_quiet_and_gives_the_memory_back():
    trimmed = asyncio.Event()
    trims = []
    heap = HeapTrimmer(lambda: (trims.append(1), trimmed.set()), burst=3, quiet_s=0.05)
    for count in (1, 2, 1):  # never 3 at once: no burst
        heap.admitted(count)
    heap.idle()
    assert heap._pending is None and trims == []

    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(4096 + i % 8) for i in range(20_000)]  # ~80 MiB, below mmap's threshold: heap
    for block in blocks:
        ctypes.memset(block, 1, 4096)  # touched: resident
    for i, block in enumerate(blocks):
        if i % 64:  # a few stay allocated, scattered: the top of the heap cannot simply shrink
            libc.free(block)
    before = rss_bytes()
    heap.admitted(3)
    heap.idle()
    heap.admitted(1)  # busy again before the quiet time: put off
    assert heap._pending is None and trims == []
    heap.idle()
    await asyncio.wait_for(trimmed.wait(), 5)
    assert trims == [1]
    assert rss_bytes() < before - 40 * 2**20, (before, rss_bytes())
    heap.idle()  # no new burst since: nothing to do
    assert heap._pending is None
    for block in blocks[::64]:
        libc.free(block)
