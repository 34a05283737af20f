"""Exact (and, on TPU, approximate) top-k inner-product search with the index rows split over a mesh.

    rows = place_rows(vectors, row_mesh())             # (N, D) float32 -> ShardedRows over every device
    scores, ids = top_k(rows, queries, k=10)           # (Q, D) -> (Q, k) float32, (Q, k) int32

The index rows are cut into one contiguous slice per device of a 1-D mesh (axis `"rows"`), so an index
larger than one device's memory fits as long as each slice does. Every device scans its slice in
blocks of `block` rows: one matrix product `queries @ block.T` and a top-k per block, merged into the
device's running top-k. The devices' candidates, `(devices, Q, k)`, are then merged once. Rows added to
make the slices equal are scored -inf, so they never win over a real row.

Ties are broken like a stable sort on the negated score: on equal scores the lower row index comes
first. `lax.top_k` returns equal values in index order, and every merge concatenates the candidates in
row order (earlier blocks before later ones, device 0 before device 1), so the order survives merging.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

ROWS = "rows"  # the mesh axis the index rows are split over

# Rows scored per matrix product: large enough to keep the matmul efficient, small enough that the
# (queries, block) score matrix stays a few hundred MB for a thousand queries.
DEFAULT_BLOCK_ROWS = 32768


def row_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `"rows"` over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (ROWS,))


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How `count` rows are padded and split over `num_devices` devices, in blocks of `block` rows.

    Attributes:
      count: real rows.
      num_devices: devices on the mesh axis.
      block: rows per matrix product; divides `rows_per_device`.
      rows_per_device: rows each device holds, padding included.
    """

    count: int
    num_devices: int
    block: int
    rows_per_device: int

    @property
    def padded_count(self) -> int:
        return self.num_devices * self.rows_per_device


def row_layout(count: int, num_devices: int, block_rows: int = DEFAULT_BLOCK_ROWS) -> RowLayout:
    """Pads `count` rows as little as possible so that every device holds the same whole number of blocks.

    A device's share is cut into as few blocks of at most `block_rows` (rounded up to 8) rows as
    possible, of equal size: 10M rows on 8 devices hold 1,250,184 rows each, not 1/8 plus a block.
    """
    if count < 1:
        raise ValueError(f"the index is empty (count={count}); add vectors before searching")
    if num_devices < 1 or block_rows < 1:
        raise ValueError(f"need num_devices >= 1 and block_rows >= 1, got {num_devices=}, {block_rows=}")
    share = math.ceil(count / num_devices)
    num_blocks = math.ceil(share / block_rows)
    block = 8 * math.ceil(share / num_blocks / 8)
    return RowLayout(count, num_devices, block, block * num_blocks)


@dataclasses.dataclass(frozen=True)
class ShardedRows:
    """Index rows placed on a mesh for `top_k`.

    Attributes:
      rows: float32 `(layout.padded_count, D)`, sharded `P("rows", None)`; padding rows are zeros.
      layout: the padding and blocks.
      mesh: the 1-D mesh holding them.
    """

    rows: jax.Array
    layout: RowLayout
    mesh: Mesh

    @property
    def dim(self) -> int:
        return self.rows.shape[1]


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over the mesh's `"rows"` axis, the embedding dimension whole on each device."""
    return NamedSharding(mesh, P(ROWS, None))


def place_rows(vectors: np.ndarray, mesh: Mesh, *, block_rows: int = DEFAULT_BLOCK_ROWS) -> ShardedRows:
    """Puts `vectors` (float32 `(N, D)`, e.g. a memory-mapped array) on `mesh`, one slice per device.

    Each device's slice is cut and padded on the host on its own, so the padded whole is never copied.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (N, D), got shape {vectors.shape}")
    layout = row_layout(len(vectors), mesh.shape[ROWS], block_rows)

    def shard(index: tuple[slice, slice]) -> np.ndarray:
        start, stop = index[0].start or 0, index[0].stop or layout.padded_count
        part = np.zeros((stop - start, vectors.shape[1]), np.float32)
        real = vectors[start:min(stop, layout.count)]
        part[:len(real)] = real
        return part

    rows = jax.make_array_from_callback((layout.padded_count, vectors.shape[1]), row_sharding(mesh), shard)
    return ShardedRows(rows, layout, mesh)


def top_k(rows: ShardedRows, queries: np.ndarray | jax.Array, k: int, *,
          recall_target: float | None = None) -> tuple[jax.Array, jax.Array]:
    """The `k` rows with the largest inner product with each query.

    Args:
      rows: the index rows on their mesh.
      queries: float32 `(Q, D)`.
      k: results per query, 1 <= k <= the number of real rows.
      recall_target: None for exact search; a value in (0, 1] selects with `lax.approx_max_k` at that
        expected recall (approximate on TPU only; other backends compute it exactly).

    Returns:
      `(scores, ids)`: float32 `(Q, k)` in decreasing order, and int32 `(Q, k)` row indices; equal
      scores in increasing row order.
    """
    queries = jnp.asarray(queries, jnp.float32)
    if queries.ndim != 2 or queries.shape[1] != rows.dim:
        raise ValueError(f"queries must be (Q, {rows.dim}) to match the index, got shape {queries.shape}")
    if not 1 <= k <= rows.layout.count:
        raise ValueError(f"k={k} must be between 1 and the number of indexed vectors ({rows.layout.count})")
    if recall_target is not None and not 0 < recall_target <= 1:
        raise ValueError(f"recall_target must be in (0, 1], got recall_target={recall_target}")
    queries = jax.device_put(queries, NamedSharding(rows.mesh, P()))
    return _top_k(rows.rows, queries, k=k, count=rows.layout.count, block=rows.layout.block,
                  mesh=rows.mesh, recall_target=recall_target)


def lower_top_k(layout: RowLayout, dim: int, mesh: Mesh, num_queries: int, k: int, *,
                recall_target: float | None = None) -> jax.stages.Lowered:
    """`top_k` for rows of `layout` lowered from shapes alone, allocating nothing: e.g.
    `.compile().memory_analysis()` gives the per-device bytes of an index too large to build here."""
    rows = jax.ShapeDtypeStruct((layout.padded_count, dim), jnp.float32, sharding=row_sharding(mesh))
    queries = jax.ShapeDtypeStruct((num_queries, dim), jnp.float32, sharding=NamedSharding(mesh, P()))
    return _top_k.lower(rows, queries, k=k, count=layout.count, block=layout.block, mesh=mesh,
                        recall_target=recall_target)


@functools.partial(jax.jit, static_argnames=("k", "count", "block", "mesh", "recall_target"))
def _top_k(rows: jax.Array, queries: jax.Array, *, k: int, count: int, block: int, mesh: Mesh,
           recall_target: float | None) -> tuple[jax.Array, jax.Array]:
    """`top_k` on placed arrays: per-device candidates `(devices, Q, k)`, then one merge."""
    per_device = jax.shard_map(
        functools.partial(_device_top_k, k=k, count=count, block=block, recall_target=recall_target),
        mesh=mesh, in_specs=(P(ROWS, None), P()), out_specs=(P(ROWS), P(ROWS)))
    scores, ids = per_device(rows, queries)  # (devices, Q, k), device order = row order
    num_queries = queries.shape[0]
    scores = scores.transpose(1, 0, 2).reshape(num_queries, -1)
    ids = ids.transpose(1, 0, 2).reshape(num_queries, -1)
    return _take_top_k(scores, ids, k)


def _device_top_k(rows: jax.Array, queries: jax.Array, *, k: int, count: int, block: int,
                  recall_target: float | None) -> tuple[jax.Array, jax.Array]:
    """One device's top-k over its slice `rows` `(R, D)`: returns `(1, Q, k)` scores and global ids."""
    num_rows, dim = rows.shape
    first_row = jax.lax.axis_index(ROWS) * num_rows
    select = _selector(min(k, block), recall_target)

    def scan_block(best, block_and_start):
        block_rows, start = block_and_start
        scores = jnp.dot(queries, block_rows.T, precision=jax.lax.Precision.HIGHEST)  # (Q, block)
        ids = first_row + start + jnp.arange(block, dtype=jnp.int32)
        scores = jnp.where(ids < count, scores, -jnp.inf)
        block_scores, positions = select(scores)
        candidates = (jnp.concatenate([best[0], block_scores], axis=1),
                      jnp.concatenate([best[1], ids[positions]], axis=1))
        return _take_top_k(*candidates, k), None

    empty = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32), jnp.full((queries.shape[0], k), -1, jnp.int32))
    empty = jax.lax.pcast(empty, (ROWS,), to="varying")  # the carry differs per device, like its updates
    starts = jnp.arange(0, num_rows, block, dtype=jnp.int32)
    (scores, ids), _ = jax.lax.scan(scan_block, empty, (rows.reshape(-1, block, dim), starts))
    return scores[None], ids[None]


# ----------------------------------------------------------------------------- the host (CPU) path

# Rows per group whose largest score is compared with a query's threshold: a group only is looked at when its
# maximum beats the query's current k-th score, so nearly all of the scores are read once, by one max.
HOST_GROUP_ROWS = 16
# Candidates gathered before they are merged into the running top-k (and the thresholds raised): at least
# `Q * k`, so that the merges' sorts cost about as much as the candidates do.
HOST_MERGE_CANDIDATES = 1 << 16
# Bytes of the `(block, Q)` float32 score tile: small enough to stay in a core's own cache between the matrix
# product that writes it and the group maxima that read it (1,000 queries: 512 rows), large enough for an
# efficient product (experiments/search_benchmark.py's host rows).
HOST_TILE_BYTES = 2 << 20


def host_block_rows(num_queries: int, k: int, tile_bytes: int = HOST_TILE_BYTES, group: int = HOST_GROUP_ROWS) -> int:
    """Index rows per matrix product of `host_top_k`: a `(rows, num_queries)` float32 tile of about `tile_bytes`,
    at least 256 rows (the product's efficiency) and `k` (a first threshold), a multiple of `group`."""
    rows = max(256, tile_bytes // (4 * max(num_queries, 1)), k)
    return group * math.ceil(rows / group)


def host_top_k(vectors: np.ndarray, queries: np.ndarray, k: int, *, block_rows: int | None = None,
               group: int = HOST_GROUP_ROWS, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` on the host with NumPy: the same results, for a CPU, where the BLAS product beats XLA's.

    The rows are scanned in blocks: one BLAS product `block @ queries.T` gives a `(block, Q)` score tile
    (rows outermost, so that the maxima of `group` consecutive rows are elementwise maxima of contiguous
    query vectors). Only the groups whose maximum beats the query's threshold (its k-th best score so far; in
    the first block, that block's own k-th best score) are read in full; their scores
    above it are kept as candidates, and merged exactly with the running top-k (a stable sort on
    `(query, -score, row)`) when they pile up and at the end, so that equal scores keep the lower row, as
    `top_k` does. (A candidate must beat the threshold strictly: a later row with an equal score never wins.)

    With `threads` > 1 the rows are cut into that many contiguous ranges, each scanned by its own thread
    with a one-thread BLAS, and the ranges' results merged in row order: each core then filters one tile
    while the others multiply, instead of every core waiting for one thread's filtering between products.

    Args:
      vectors: float32 `(N, D)` (e.g. memory-mapped); queries: float32 `(Q, D)`; 1 <= k <= N.
      block_rows: rows per product (default `host_block_rows`), at least `k`, rounded up to a multiple of `group`.
      threads: scanning threads (default: the CPU cores this process may use); fewer when the rows are few.

    Returns:
      `(scores, ids)`: float32 `(Q, k)` in decreasing order and int64 `(Q, k)` row indices.
    """
    vectors, queries = np.asarray(vectors), np.asarray(queries, np.float32)
    if vectors.ndim != 2 or queries.ndim != 2 or queries.shape[1] != vectors.shape[1]:
        raise ValueError(f"need vectors (N, D) and queries (Q, D), got {vectors.shape} and {queries.shape}")
    count, num_queries = len(vectors), len(queries)
    if not 1 <= k <= count:
        raise ValueError(f"k={k} must be between 1 and the number of indexed vectors ({count})")
    block = group * math.ceil(max(block_rows or host_block_rows(num_queries, k, group=group), k) / group)
    num_blocks = math.ceil(count / block)
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    edges = _ranges(count, block, k, max(1, min(threads, num_blocks)))
    if len(edges) == 2:
        return _scan(vectors, queries, k, 0, count, block, group).as_arrays(num_queries, k)
    threads = len(edges) - 1
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 - only the threaded scan needs it

    with threadpool_limits(limits=1, user_api="blas"), \
            concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="jaxembed-top-k") as pool:
        parts = list(pool.map(lambda edge: _scan(vectors, queries, k, edge[0], edge[1], block, group),
                              zip(edges[:-1], edges[1:])))
    return _Candidates.concatenate(parts).top(k, num_queries).as_arrays(num_queries, k)


def _ranges(count: int, block: int, k: int, parts: int) -> list[int]:
    """Edges of `parts` (or fewer) contiguous ranges of whole blocks covering `count` rows, each of at least
    `k` rows (the last block may be short)."""
    num_blocks = math.ceil(count / block)
    for parts in range(parts, 1, -1):
        edges = [round(num_blocks * part / parts) * block for part in range(parts)] + [count]
        if all(stop - start >= k for start, stop in zip(edges[:-1], edges[1:])):
            return edges
    return [0, count]


def _scan(vectors: np.ndarray, queries: np.ndarray, k: int, first: int, stop: int, block: int,
          group: int) -> _Candidates:
    """The top `k` of rows `first:stop` for each query (`host_top_k`'s scan of one range), ordered by query."""
    num_queries = len(queries)
    queries_t = queries.T  # a view: BLAS reads it transposed
    tile = np.empty((min(block, stop - first), num_queries), np.float32)
    best = _Candidates.empty(num_queries)
    pending: list[_Candidates] = [best]
    pending_size, limit = 0, max(num_queries * k, HOST_MERGE_CANDIDATES)
    threshold = np.full(num_queries, -np.inf, np.float32)
    for start in range(first, stop, block):
        rows = np.asarray(vectors[start:min(start + block, stop)], np.float32)
        scores = np.matmul(rows, queries_t, out=tile[:len(rows)])  # (b, Q)
        whole = len(rows) // group * group
        maxima = scores[:whole].reshape(-1, group, num_queries).max(axis=1)  # (groups, Q)
        if whole < len(rows):
            maxima = np.concatenate([maxima, scores[whole:].max(axis=0, keepdims=True)])
        if start == first:  # no threshold yet: the top k of this block are its scores >= its k-th best
            kth = np.partition(scores, len(rows) - k, axis=0)[len(rows) - k]  # (Q,); the range has >= k rows
            hit_groups, hit_queries = _hits(maxima >= kth)
            floor, strict = kth[hit_queries], False
        else:
            hit_groups, hit_queries = _hits(maxima > threshold)
            floor, strict = threshold[hit_queries], True
        if len(hit_groups):
            row_ids = np.minimum(hit_groups[:, None] * group + np.arange(group), len(rows) - 1)  # (C, group)
            found = scores[row_ids, hit_queries[:, None]]
            keep = found > floor[:, None] if strict else found >= floor[:, None]
            keep &= (hit_groups[:, None] * group + np.arange(group)) < len(rows)  # the last group may be short
            pending.append(_Candidates(np.broadcast_to(hit_queries[:, None], keep.shape)[keep], found[keep],
                                       start + row_ids[keep].astype(np.int64)))
            pending_size += int(keep.sum())
        if start == first or pending_size > limit:
            best = _Candidates.concatenate(pending).top(k, num_queries)
            pending, pending_size, threshold = [best], 0, best.scores.reshape(num_queries, k)[:, -1]
    return _Candidates.concatenate(pending).top(k, num_queries)


def _hits(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.nonzero(mask)` of a `(groups, Q)` mask that is mostly False, reading only the groups with a hit."""
    flat = mask.reshape(-1)
    if flat.size % 8:
        return np.nonzero(mask)
    words = np.flatnonzero(flat.view(np.uint64))  # 8 entries at a time: most words are 0
    positions = (words[:, None] * 8 + np.arange(8)).reshape(-1)
    return np.divmod(positions[flat[positions]], mask.shape[1])


@dataclasses.dataclass(frozen=True)
class _Candidates:
    """Flat candidate results: query number, score and row of each."""

    queries: np.ndarray  # int (n,)
    scores: np.ndarray  # float32 (n,)
    ids: np.ndarray  # int64 (n,)

    @classmethod
    def empty(cls, num_queries: int) -> _Candidates:
        return cls(np.zeros(0, np.intp), np.zeros(0, np.float32), np.zeros(0, np.int64))

    @classmethod
    def concatenate(cls, parts: list[_Candidates]) -> _Candidates:
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("queries", "scores", "ids")))

    def as_arrays(self, num_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(scores (Q, k), ids (Q, k))` of a result of `top`."""
        return self.scores.reshape(num_queries, k), self.ids.reshape(num_queries, k)

    def top(self, k: int, num_queries: int) -> _Candidates:
        """The `k` best of each query (every query has at least `k`), by decreasing score then increasing row,
        ordered by query."""
        # One stable sort on (query, descending score) in a 64-bit key: the float's bits made to sort in
        # decreasing order below the query number. Equal keys keep their order, which is increasing row: the
        # running top-k (earlier rows) comes first, then the candidates in the order the blocks gave them.
        bits = (self.scores + np.float32(0)).view(np.uint32).astype(np.uint64)  # + 0: -0.0 becomes 0.0
        descending = np.where(bits >> 31, bits, bits ^ 0x7FFFFFFF)
        order = np.argsort((self.queries.astype(np.uint64) << 32) | descending, kind="stable")
        starts = np.searchsorted(self.queries[order], np.arange(num_queries))
        taken = order[(starts[:, None] + np.arange(k)).ravel()]
        return _Candidates(self.queries[taken], self.scores[taken], self.ids[taken])


def _selector(k: int, recall_target: float | None):
    """`scores (Q, n) -> (values (Q, k), positions (Q, k))`: exact top-k, or approx_max_k."""
    if recall_target is None:
        return lambda scores: jax.lax.top_k(scores, k)
    return lambda scores: jax.lax.approx_max_k(scores, k, recall_target=recall_target)


def _take_top_k(scores: jax.Array, ids: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The `k` best of candidates `(Q, n)` given in row order; ties keep that order."""
    best, positions = jax.lax.top_k(scores, k)
    return best, jnp.take_along_axis(ids, positions, axis=1)
