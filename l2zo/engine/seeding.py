"""Seeded regeneration of the random direction z, never stored, never from the global RNG.

z for block b at step seed s is defined chunk by chunk: the flat tensor is cut into chunks of
``Z_CHUNK`` elements and chunk c is ``randn(n, generator=G(mix(s, b, c)))`` on the block's device.
That definition makes z independent of buffer sizes and of how many blocks come before, lets a few
reused buffers serve every chunk (so regeneration costs no parameter-sized memory), and keeps the
per-device generators away from the global RNG (MeZO's ``torch.manual_seed`` clobbers it).

Speed. On CPU, ``randn`` with a generator runs on one core (the Mersenne twister is sequential), and a
pass over 135M parameters costs about a third of a forward pass. Because every chunk has its own seed,
chunks are independent: ``ZSource.stream`` generates them on ``workers`` threads, ahead of the consumer
that adds them into theta, with one buffer per thread in flight. The values are the same whichever
thread draws a chunk, so the parallel path is bit for bit the sequential one (a test asserts it).
``cache=True`` keeps the current seed's z (one parameter-sized copy, off by default): the three passes
of a step then generate z once.

Shards. A process holding only entries [offset, offset + n) of a block's flattened tensor (an FSDP2 row
shard, ``Block.span``) draws only the chunks that overlap them, each whole (``randn``'s values depend on how
many are drawn), and uses the overlapping slice: at most two partially used chunks per block and process, and
the union over processes is bit for bit the unsharded z. DTensor's own RNG is not used: it refuses CPU and its
sharded values differ from the unsharded ones (pytorch #168058).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from l2zo.engine.hashing import mix_seed
from l2zo.engine.noise_table import NoiseTable

if TYPE_CHECKING:
    from l2zo.engine.blocks import Block

# Part of the definition of z: changing it changes every z (and so every replayed run).
Z_CHUNK = 1 << 20
# Chunks smaller than this are drawn on the consumer's thread: a thread hand-off costs more than drawing them.
_INLINE = 1 << 15


class ZSource:
    """Per-device generators and reusable chunk buffers for regenerating z.

    One instance lives in each optimizer. It holds a few ``Z_CHUNK`` buffers per (device, dtype), plus,
    with ``cache=True``, one copy of the latest seed's z per block.

    Args:
        workers: CPU threads drawing chunks in parallel in :meth:`stream` (default: torch's intra-op thread
            count; 1 draws on the caller's thread). CUDA generation is asynchronous already: always inline.
        cache: keep the z of the latest (seed, block) pairs streamed, so passes repeating a seed read it back
            instead of regenerating it (costs one parameter-sized copy; off by default).
        table: draw z as windows of this seeded noise table instead of ``randn`` (``l2zo.engine.noise_table``):
            another definition of z, at memory speed. ``workers`` and ``cache`` then do nothing (a window is
            already stored).
    """

    def __init__(self, workers: int | None = None, cache: bool = False, table: NoiseTable | None = None) -> None:
        self.workers = max(1, int(workers if workers is not None else _default_workers()))
        self.cache = bool(cache) and table is None
        self.table = table
        self._gens: dict[torch.device, torch.Generator] = {}
        self._bufs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._local = threading.local()
        self._pool: ThreadPoolExecutor | None = None
        self._ring: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self._cached: dict[int, tuple[int, torch.Tensor]] = {}  # block index -> (seed, flat z)

    # -- pickling / copying: threads and generators are rebuilt on demand ------------------------------------
    def __getstate__(self) -> dict:
        table = None if self.table is None else (self.table.size, self.table.table_seed)
        return {"workers": self.workers, "cache": self.cache, "table": table}

    def __setstate__(self, state: dict) -> None:
        table = state.get("table")
        self.__init__(state["workers"], state["cache"], None if table is None else NoiseTable(*table))

    def describe(self) -> dict:
        """What z means for this source (the run records it beside its seed): the Mersenne twister's chunks, or a
        noise table's windows."""
        if self.table is None:
            return {"kind": "randn", "chunk": Z_CHUNK}
        return {"kind": "table", **self.table.describe()}

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device)
        return self._gens[device]

    def _thread_generator(self, device: torch.device) -> torch.Generator:
        gens = getattr(self._local, "gens", None)
        if gens is None:
            gens = self._local.gens = {}
        if device not in gens:
            gens[device] = torch.Generator(device=device)
        return gens[device]

    def _buffer(self, device: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
        key = (device, dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(min(Z_CHUNK, max(n, 1)), device=device, dtype=dtype)
            self._bufs[key] = buf
        return buf[:n]

    def chunks(
        self, param: torch.Tensor, seed: int, block_index: int, span: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(start, end, z_chunk)`` covering ``param.view(-1)``, drawn on the caller's thread.

        ``z_chunk`` is a view into a reused buffer: consume it before advancing the iterator.
        It has the parameter's dtype and device (z in the weight dtype, as MeZO).
        ``span``: ``(offset, total)`` when ``param`` is a shard, entries [offset, offset + numel) of a flattened
        block of ``total`` entries (``Block.span``); z is then that slice of the block's z.
        """
        if self.table is not None:
            yield from self.table.chunks(param, seed, block_index, span)
            return
        n = param.numel()
        gen = self.generator(param.device)
        if span is None or span == (0, n):
            for c, start in enumerate(range(0, n, Z_CHUNK)):
                end = min(start + Z_CHUNK, n)
                gen.manual_seed(mix_seed(seed, block_index, c))
                buf = self._buffer(param.device, param.dtype, end - start)
                torch.randn(end - start, generator=gen, out=buf)
                yield start, end, buf
            return
        for c, size, lo, start, end in shard_chunks(n, *span):
            gen.manual_seed(mix_seed(seed, block_index, c))
            buf = self._buffer(param.device, param.dtype, size)
            torch.randn(size, generator=gen, out=buf)
            yield start, end, buf[lo : lo + end - start]

    def full(
        self, param: torch.Tensor, seed: int, block_index: int, span: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """The whole z of one block (or of one shard, see :meth:`chunks`) as a new tensor shaped like ``param``."""
        out = torch.empty_like(param).view(-1)
        for start, end, z in self.chunks(param, seed, block_index, span):
            out[start:end].copy_(z)
        return out.view_as(param)

    # -- the fast path: every block of a pass, chunks drawn ahead on worker threads ----------------------------
    def stream(self, blocks: Sequence[Block], seed: int) -> Iterator[tuple[Block, int, int, torch.Tensor]]:
        """Yield ``(block, start, end, z_chunk)`` for every chunk of every block, in order.

        The values are exactly those of :meth:`chunks`. ``z_chunk`` ([end - start], the parameter's dtype) is only
        valid until the iterator advances. With ``cache=True``, blocks whose z for ``seed`` is cached are read back,
        and the others are drawn into the cache.
        """
        if self.table is not None:
            for b in blocks:
                for start, end, z in self.table.chunks(b.local, seed, b.index, b.span):
                    yield b, start, end, z
            return
        if self.cache:
            yield from self._stream_cached(blocks, seed)
            return
        # (block, its flat local tensor, chunk c, entries drawn, slice [lo, lo + end - start) -> local [start, end))
        jobs = []
        for b in blocks:
            local = b.local
            jobs += [(b, local, *chunk) for chunk in shard_chunks(local.numel(), *b.span)]
        if self.workers == 1 or not jobs or jobs[0][1].device.type != "cpu":
            for b in blocks:
                local = b.local
                for start, end, z in self.chunks(local, seed, b.index, b.span):
                    yield b, start, end, z
            return
        pool = self._executor()
        # Buffers as large as the largest chunk of this pass (at most Z_CHUNK): a small model keeps small buffers.
        size = max(job[3] for job in jobs)
        pending: deque[tuple[tuple, torch.Tensor, Future | None]] = deque()
        queue = iter(jobs)

        def submit() -> bool:
            job = next(queue, None)
            if job is None:
                return False
            b, local, c, n, _, _, _ = job
            chunk_seed = mix_seed(seed, b.index, c)
            ring = self._ring.setdefault((local.device, local.dtype), [])
            while ring and ring[-1].numel() < n:  # too small for this pass: let it go
                ring.pop()
            buf = ring.pop() if ring else torch.empty(size, device=local.device, dtype=local.dtype)
            fut = None if n < _INLINE else pool.submit(self._draw, buf[:n], chunk_seed)
            pending.append((job, buf, fut))
            return True

        # One chunk per worker in flight, plus the one being consumed.
        for _ in range(self.workers + 1):
            if not submit():
                break
        # The consumer's ops (add_ of one chunk) run on one intra-op thread during the pass: a multi-threaded
        # add_ leaves OpenMP threads spinning after each chunk, on the very cores the drawing threads need
        # (measured: slower than drawing on one thread). Restored when the pass ends or is abandoned.
        intra = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            while pending:
                (b, local, c, n, lo, start, end), buf, fut = pending.popleft()
                if fut is None:  # small: drawn here, now
                    z = self._draw(buf[:n], mix_seed(seed, b.index, c))
                else:
                    z = fut.result()
                yield b, start, end, (z if n == end - start else z[lo : lo + end - start])
                self._ring[(local.device, local.dtype)].append(buf)
                submit()
        finally:  # an abandoned stream must not leave draws writing into buffers handed out again
            torch.set_num_threads(intra)
            for _, _buf, fut in pending:
                if fut is not None:
                    fut.result()
            # The ring lives for one pass only. A pass never overlaps a forward, so freeing it here keeps the
            # ring (workers + 1 chunks, 12 MiB with 2 workers) out of the step's peak, which is then the forward's
            # own. Re-allocating it costs ~1% of a pass over a large model; a small model's ring is small.
            self._ring.clear()

    def _draw(self, out: torch.Tensor, chunk_seed: int) -> torch.Tensor:
        gen = self._thread_generator(out.device)
        gen.manual_seed(chunk_seed)
        return torch.randn(out.numel(), generator=gen, out=out)

    def _stream_cached(self, blocks: Sequence[Block], seed: int) -> Iterator[tuple[Block, int, int, torch.Tensor]]:
        missing = [b for b in blocks if self._cached.get(b.index, (None,))[0] != seed]
        if missing:
            plain = ZSource(workers=self.workers)
            plain._pool, plain._ring = self._executor(), self._ring  # share threads and buffers
            for b, start, end, z in plain.stream(missing, seed):
                local = b.local
                old = self._cached.get(b.index)
                flat = old[1] if old is not None and old[1].numel() == local.numel() else torch.empty(
                    local.numel(), device=local.device, dtype=local.dtype)  # fmt: skip
                flat[start:end].copy_(z)
                self._cached[b.index] = (seed if end == local.numel() else -1, flat)
        for b in blocks:
            flat = self._cached[b.index][1]
            for start in range(0, flat.numel(), Z_CHUNK):
                end = min(start + Z_CHUNK, flat.numel())
                yield b, start, end, flat[start:end]

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="l2zo-z")
        return self._pool


def shard_chunks(numel: int, offset: int = 0, total: int | None = None) -> list[tuple[int, int, int, int, int]]:
    """The chunks of z that cover a flat shard: entries [offset, offset + numel) of a block of ``total`` entries.

    Returns ``(c, size, lo, start, end)`` per overlapping chunk, in order: chunk c of the block is drawn whole
    (``size`` entries, one seed), and its entries [lo, lo + end - start) are the shard's entries [start, end).
    Unsharded (offset 0, total numel): every chunk whole, ``lo`` 0. Only the first and last can be partial.
    """
    total = numel if total is None else total
    if offset == 0 and total == numel:  # unsharded: every chunk whole
        return [
            (c, min(Z_CHUNK, numel - s), 0, s, min(s + Z_CHUNK, numel)) for c, s in enumerate(range(0, numel, Z_CHUNK))
        ]
    if numel == 0:
        return []
    if offset < 0 or offset + numel > total:
        raise ValueError(f"shard [{offset}, {offset + numel}) lies outside a tensor of {total} entries")
    out = []
    for c in range(offset // Z_CHUNK, (offset + numel - 1) // Z_CHUNK + 1):
        c0 = c * Z_CHUNK
        size = min(Z_CHUNK, total - c0)
        a, b = max(c0, offset), min(c0 + size, offset + numel)
        out.append((c, size, a - c0, a - offset, b - offset))
    return out


def _default_workers() -> int:
    """Threads for z generation: torch's intra-op thread count (what the forward passes use), at most 8."""
    return min(torch.get_num_threads(), os.cpu_count() or 1, 8)
