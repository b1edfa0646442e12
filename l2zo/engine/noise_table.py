"""z at memory speed: windows of one seeded table of Gaussian noise instead of freshly drawn numbers.

Evolution strategies at scale (Salimans et al. 2017) index a large shared table of N(0,1) noise at seeded offsets
instead of generating it. Here the table holds ``size`` iid N(0,1) floats, drawn once from ``table_seed``, then
centred and scaled to mean 0 and variance 1 exactly. A block's z is cut into windows of ``WINDOW`` consecutive
entries; window w of block b at step seed s is the table's ``WINDOW`` entries starting at offset o(s, b, w), read
circularly. The offsets are drawn uniformly in [0, size) by a generator seeded with mix_seed(s, b, TAG), one
integer per window.

What a seed means is then (table_seed, size, offsets): it is part of the run's configuration, recorded beside
the seed, and never mixed with the Mersenne-twister z of the default source.

Statistics (tested in tests/test_noise_table.py), for u = z of one block, offsets uniform and independent:

* every entry has mean 0 and variance 1 exactly (over offsets), since the table is standardised exactly;
* entries in different windows are uncorrelated (E[z_i z_j] = mean(table)^2 = 0);
* entries i < j of one window have E[z_i z_j] = r(j - i), the table's circular autocorrelation at that lag, about
  N(0, 1/size) each. E[z z^T] is block-diagonal over windows with Toeplitz blocks R = [r(j - i)]: R is a principal
  submatrix of the table's circulant autocorrelation, so it is positive semi-definite with unit diagonal, and its
  eigenvalues are averages of the table's power spectrum over about size / WINDOW frequencies, so they lie within
  about 1 +/- 3 sqrt(WINDOW / size). The SPSA estimate is therefore unbiased for the gradient preconditioned by
  this fixed R (a descent direction), and exactly unbiased for the gradient as size / WINDOW grows: with the default
  2^19 entries and 512-entry windows, R's eigenvalues lie within about 1 +/- 0.1;
* two windows of a step overlap (share table entries) with probability about 2 * WINDOW / size each, which is what
  makes entries of different windows equal, never correlated in expectation.

Cost: a window is a contiguous slice of the table, gathered in groups of ``GROUP`` windows into one reusable buffer
(1 MiB) and added into theta: memory traffic only, ~10x cheaper than ``randn`` on CPU. The table costs ``size``
entries once per device and dtype (2 MiB at the default size in fp32: within the 5% memory budget over inference
on SmolLM2-135M, and resident in a server CPU's last-level cache). It is drawn and standardised in chunks, so
building it never holds more than the table and one 2 MiB chunk.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from l2zo.engine.hashing import mix_seed

WINDOW = 1 << 9  # entries of z per table window (part of the definition of z)
GROUP = 512  # windows gathered per buffer: 256K entries, 1 MiB in fp32
DEFAULT_SIZE = 1 << 19
_DRAW_CHUNK = 1 << 18  # fp64 entries drawn at a time while building the table (2 MiB)
_TAG = 0x5A7AB1E  # separates the offsets' seeds from the Mersenne-twister source's chunk seeds


class NoiseTable:
    """A standardised table of iid N(0,1) noise and the seeded windows that make z.

    Args:
        size: entries in the table (>= 2 * WINDOW).
        table_seed: the seed the table is drawn from.
    """

    def __init__(self, size: int = DEFAULT_SIZE, table_seed: int = 0) -> None:
        if int(size) < 2 * WINDOW:
            raise ValueError(
                f"a noise table needs at least {2 * WINDOW} entries (got {size}); use 524288 (the default)"
            )
        self.size = int(size)
        self.table_seed = int(table_seed)
        self._values: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._gens: dict[torch.device, torch.Generator] = {}

    def describe(self) -> dict[str, int]:
        """What z means with this table: recorded beside the seed."""
        return {"size": self.size, "table_seed": self.table_seed, "window": WINDOW}

    def values(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[size + WINDOW] the table, its first WINDOW entries repeated at the end (circular windows are slices)."""
        key = (torch.device(device), dtype)
        if key not in self._values:
            self._values[key] = self._build(key[0], dtype)
        return self._values[key]

    def _draws(self) -> Iterator[torch.Tensor]:
        """The table's fp64 N(0,1) draws, chunk by chunk, the same each time it is called."""
        gen = torch.Generator().manual_seed(self.table_seed)
        for lo in range(0, self.size, _DRAW_CHUNK):
            yield torch.randn(min(_DRAW_CHUNK, self.size - lo), generator=gen, dtype=torch.float64)

    def _build(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Two passes over the draws: fp64 moments, then the standardised values written into the table, so that
        z's moments hold exactly over offsets (mean 0, variance 1, to fp64 rounding before the cast)."""
        total = sq = 0.0
        for c in self._draws():
            total, sq = total + float(c.sum()), sq + float(c.square().sum())
        mean = total / self.size
        std = (sq / self.size - mean * mean) ** 0.5
        out = torch.empty(self.size + WINDOW, device=device, dtype=dtype)
        lo = 0
        for c in self._draws():
            out[lo : lo + len(c)] = (c - mean) / std
            lo += len(c)
        out[self.size :] = out[:WINDOW]
        return out

    def offsets(self, seed: int, block_index: int, windows: int, device: torch.device) -> torch.Tensor:
        """[windows] int64 start of each window of a block's z, uniform in [0, size), on ``device``."""
        gen = self._gens.setdefault(torch.device("cpu"), torch.Generator())
        gen.manual_seed(mix_seed(seed, block_index, _TAG))
        return torch.randint(0, self.size, (windows,), generator=gen).to(device)

    def chunks(
        self, param: torch.Tensor, seed: int, block_index: int, span: tuple[int, int] | None = None
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(start, end, z_chunk)`` covering ``param.view(-1)`` (a shard of a ``span = (offset, total)``
        block when given), in groups of up to GROUP windows. ``z_chunk`` ([end - start], the parameter's dtype) is
        a view into a reused buffer: consume it before advancing."""
        n = param.numel()
        offset, total = span if span is not None else (0, n)
        if n == 0:
            return
        table = self.values(param.device, param.dtype).unfold(0, WINDOW, 1)  # [size + 1, WINDOW], a view
        first, last = offset // WINDOW, (offset + n - 1) // WINDOW  # the windows this shard overlaps
        offs = self.offsets(seed, block_index, (total + WINDOW - 1) // WINDOW, param.device)[first : last + 1]
        buf = torch.empty(min(GROUP, len(offs)), WINDOW, device=param.device, dtype=param.dtype)
        for g in range(0, len(offs), GROUP):
            idx = offs[g : g + GROUP]
            z = torch.index_select(table, 0, idx, out=buf[: len(idx)]).view(-1)
            w0 = (first + g) * WINDOW  # the block entry z[0] stands for
            start, end = max(w0, offset), min(w0 + z.numel(), offset + n)
            yield start - offset, end - offset, z[start - w0 : end - w0]
