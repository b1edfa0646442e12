"""Seeded regeneration of the random direction z, never stored, never from the global RNG.

z for block b at step seed s is defined chunk by chunk: the flat tensor is cut into chunks of
``Z_CHUNK`` elements and chunk c is ``randn(n, generator=G(mix(s, b, c)))`` on the block's device.
That definition makes z independent of buffer sizes and of how many blocks come before, lets one
reused buffer serve every chunk (so regeneration costs no parameter-sized memory), and keeps the
per-device generators away from the global RNG (MeZO's ``torch.manual_seed`` clobbers it).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Part of the definition of z: changing it changes every z (and so every replayed run).
Z_CHUNK = 1 << 20
_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """Hash integers into one 63-bit seed (splitmix64 finaliser, applied in sequence)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x & ((1 << 63) - 1)


class ZSource:
    """Per-device generators and reusable chunk buffers for regenerating z.

    One instance lives in each optimizer. It holds at most one ``Z_CHUNK`` buffer per (device, dtype).
    """

    def __init__(self) -> None:
        self._gens: dict[torch.device, torch.Generator] = {}
        self._bufs: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self._gens:
            self._gens[device] = torch.Generator(device=device)
        return self._gens[device]

    def _buffer(self, device: torch.device, dtype: torch.dtype, n: int) -> torch.Tensor:
        key = (device, dtype)
        buf = self._bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = torch.empty(min(Z_CHUNK, max(n, 1)), device=device, dtype=dtype)
            self._bufs[key] = buf
        return buf[:n]

    def chunks(self, param: torch.Tensor, seed: int, block_index: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(start, end, z_chunk)`` covering ``param.view(-1)``.

        ``z_chunk`` is a view into a reused buffer: consume it before advancing the iterator.
        It has the parameter's dtype and device (z in the weight dtype, as MeZO).
        """
        n = param.numel()
        gen = self.generator(param.device)
        for c, start in enumerate(range(0, n, Z_CHUNK)):
            end = min(start + Z_CHUNK, n)
            gen.manual_seed(mix_seed(seed, block_index, c))
            buf = self._buffer(param.device, param.dtype, end - start)
            torch.randn(end - start, generator=gen, out=buf)
            yield start, end, buf

    def full(self, param: torch.Tensor, seed: int, block_index: int) -> torch.Tensor:
        """The whole z of one block as a new tensor shaped like ``param`` (tests, dense references)."""
        out = torch.empty_like(param).view(-1)
        for start, end, z in self.chunks(param, seed, block_index):
            out[start:end].copy_(z)
        return out.view_as(param)
