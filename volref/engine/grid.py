"""The block grid: how a volume is cut into tasks.

Blocks tile the volume's level-0 grid (z, y, x) from the origin. Their shape is a multiple of the
output chunks (so a block task writes whole chunks and no two tasks share a chunk) and, in y and
x, of the stages' tile grids (so every tile belongs to the same global grid whatever the block
size). Blocks at the far edges are cut by the volume::

      x ->  0        B        2B     X
      y  0  ┌────────┬────────┬──┐
            │ (0,0,0)│ (0,0,1)│  │   each block reads block + halo (stage-specific),
         B  ├────────┼────────┼──┤   writes exactly its own chunks
            │ (0,1,0)│ (0,1,1)│  │
         Y  └────────┴────────┴──┘
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from volref.errors import ConfigError

#: y/x of a default block aim at this many pixels (rounded up to the alignment)
DEFAULT_BLOCK_XY = 512


@dataclass(frozen=True, order=True)
class Block:
    """One block: its grid index and its voxel range ``[start, stop)`` per axis."""

    index: tuple[int, int, int]
    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        (z0, y0, x0), (z1, y1, x1) = self.start, self.stop
        return z1 - z0, y1 - y0, x1 - x0

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        (z0, y0, x0), (z1, y1, x1) = self.start, self.stop
        return slice(z0, z1), slice(y0, y1), slice(x0, x1)

    @property
    def key(self) -> str:
        """Region name used in manifests: the same block under another block shape differs."""
        return "_".join(f"{a}-{b}" for a, b in zip(self.start, self.stop))

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class BlockGrid:
    shape: tuple[int, int, int]
    block: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or len(self.block) != 3:
            raise ConfigError("a block grid is 3-D (z, y, x)")
        if any(b < 1 for b in self.block):
            raise ConfigError(f"block shape {self.block} must be positive")

    @property
    def counts(self) -> tuple[int, int, int]:
        return _triple(-(-n // b) for n, b in zip(self.shape, self.block))

    def __len__(self) -> int:
        return math.prod(self.counts)

    def __iter__(self) -> Iterator[Block]:
        nz, ny, nx = self.counts
        for i in range(nz):
            for j in range(ny):
                for k in range(nx):
                    yield self[(i, j, k)]

    def __getitem__(self, index: Sequence[int]) -> Block:
        ints = tuple(int(i) for i in index)
        if len(ints) != 3 or any(not 0 <= i < c for i, c in zip(ints, self.counts)):
            raise ConfigError(f"block {ints} is outside the grid {self.counts}")
        start = _triple(i * b for i, b in zip(ints, self.block))
        stop = _triple(min(s + b, n) for s, b, n in zip(start, self.block, self.shape))
        return Block(index=_triple(ints), start=start, stop=stop)

    def linear(self, index: Sequence[int]) -> int:
        """Row-major number of a block (stateless id bases use it)."""
        _, ny, nx = self.counts
        i, j, k = index
        return (i * ny + j) * nx + k

    def neighbours(self) -> Iterator[tuple[Block, Block, int]]:
        """Pairs of face-adjacent blocks ``(low, high, axis)``, in a fixed order."""
        for blk in self:
            for axis in range(3):
                nxt = list(blk.index)
                nxt[axis] += 1
                if nxt[axis] < self.counts[axis]:
                    yield blk, self[nxt], axis


def plan_blocks(shape: Sequence[int], chunks: Sequence[int], align_xy: int,
                block: Sequence[int] | None = None, min_blocks: int = 1) -> BlockGrid:
    """Check or choose a block shape for a volume.

    A block is a multiple of ``chunks`` on every axis and of ``align_xy`` (the stages' tile
    grids) in y and x; the last block on an axis may be cut by the volume. Without ``block``,
    one chunk deep in z and about :data:`DEFAULT_BLOCK_XY` pixels in y and x, smaller (down to
    the alignment unit) until there are ``min_blocks`` blocks to keep every worker busy.
    """
    shape, chunks = _triple(int(n) for n in shape), _triple(int(c) for c in chunks)
    unit = (chunks[0], math.lcm(chunks[1], align_xy), math.lcm(chunks[2], align_xy))
    if block is None:
        xy = [u * max(1, -(-min(DEFAULT_BLOCK_XY, n) // u)) for u, n in zip(unit[1:], shape[1:])]
        while len(BlockGrid(shape, (unit[0], xy[0], xy[1]))) < min_blocks:
            axis = 0 if xy[0] >= xy[1] else 1
            smaller = unit[axis + 1] * max(1, (xy[axis] // 2) // unit[axis + 1])
            if smaller == xy[axis]:
                other = 1 - axis
                smaller_other = unit[other + 1] * max(1, (xy[other] // 2) // unit[other + 1])
                if smaller_other == xy[other]:
                    break  # as small as the grid allows
                xy[other] = smaller_other
            else:
                xy[axis] = smaller
        block = (unit[0], xy[0], xy[1])
    wanted = _triple(int(b) for b in block)
    for name, b, u, n in zip("zyx", wanted, unit, shape):
        if b < 1:
            raise ConfigError(f"block shape must be positive, got {wanted}")
        if b % u and b < n:  # a block covering the whole axis may be anything
            why = f"the output chunks ({chunks})" if name == "z" or u == chunks["zyx".index(name)] \
                else f"the output chunks ({chunks}) and the {align_xy}-pixel tile grid"
            raise ConfigError(f"block shape {wanted}: {name} = {b} is not a multiple of {u}, "
                              f"required by {why}")
    # a block past the volume's end is the whole axis
    return BlockGrid(shape, _triple(min(b, u * -(-n // u)) for b, u, n in zip(wanted, unit, shape)))


def _triple(values: Iterable[int]) -> tuple[int, int, int]:
    """Three integers (z, y, x) as a typed triple; another count is a :class:`ConfigError`."""
    t = tuple(values)
    if len(t) != 3:
        raise ConfigError(f"a block grid is 3-D (z, y, x), got {t}")
    return t[0], t[1], t[2]
