"""Multi-resolution rollups of the ledger's per-step series, so a chart of any range answers in bounded time.

Two series: :data:`STEPS` (``loss`` and ``learning_rate`` of the ``steps`` table) and :data:`EVALS`
(``eval_loss`` of ``evals``). At each level ``L`` of :data:`LEVELS` the global steps are cut into aligned
blocks of ``2**L`` steps (block ``b`` = steps ``[b << L, (b + 1) << L)``); one ``rollups`` row per
non-empty block holds its row count, the sum of its global steps, and count / sum / min / max / last of
the value (NULL and NaN values are left out, as SQLite's aggregates do) and count / sum of the learning rate.

They are maintained in the writer's transaction: :func:`add` for a new row (one UPSERT for all levels),
:func:`rebuild_block` when a row is replaced, :func:`truncate_after` when rows after a step are deleted
(``Ledger.rollback_to``), :func:`rebuild_all` for an existing ledger (the schema migration) or a bulk import.
Storage: one row per 8, 16, 32, ... steps: about 1/4 of a row per step.

Reading (the idea of a segment tree, as in time-series stores' downsampled tiers): :func:`plan` keeps exact
raw buckets for ranges up to :data:`RAW_SCAN_MAX_STEPS` (``bucket_steps = ceil(span / max_points)``,
counted from ``from_step``: the behaviour before rollups, and a raw scan of at most 16,384 rows); a longer
range gets ``bucket_steps`` = the smallest block ``2**L >= ceil(span / max_points)`` (so between half of
``max_points`` and ``max_points`` buckets come back), buckets aligned to multiples of it (as time-series
databases align ``GROUP BY time``). :func:`query` then reads one rollup row per bucket in between and
computes the two end buckets, usually partial, exactly with :func:`range_aggregate`: about ``max_points``
rows plus ~4 x ``len(LEVELS)`` small reads, whatever the ledger's length.
"""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass

STEPS = 0
EVALS = 1
LEVELS = tuple(range(3, 21))  # blocks of 8, 16, ..., 1,048,576 steps
RAW_SCAN_MAX_STEPS = 16_384

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollups (
    series INTEGER NOT NULL,         -- 0: steps (loss, learning_rate), 1: evals (eval_loss)
    level INTEGER NOT NULL,          -- blocks of 2**level global steps
    block INTEGER NOT NULL,          -- global_step >> level
    n INTEGER NOT NULL,              -- rows in the block
    step_sum INTEGER NOT NULL,       -- sum of their global_step
    value_count INTEGER NOT NULL,    -- rows with a value (not NULL/NaN)
    value_sum REAL,
    value_min REAL,
    value_max REAL,
    last_step INTEGER NOT NULL,      -- the block's highest global_step ...
    value_last REAL,                 -- ... and its value
    lr_count INTEGER NOT NULL,
    lr_sum REAL,
    PRIMARY KEY (series, level, block)
) WITHOUT ROWID;
"""

# table, value column, learning-rate column (SQL NULL when the series has none)
_SOURCES = {STEPS: ("steps", "loss", "learning_rate"), EVALS: ("evals", "eval_loss", "NULL")}

_UPSERT_TAIL = """
ON CONFLICT(series, level, block) DO UPDATE SET
    n = n + excluded.n,
    step_sum = step_sum + excluded.step_sum,
    value_count = value_count + excluded.value_count,
    value_sum = value_sum + excluded.value_sum,
    value_min = min(COALESCE(value_min, excluded.value_min), COALESCE(excluded.value_min, value_min)),
    value_max = max(COALESCE(value_max, excluded.value_max), COALESCE(excluded.value_max, value_max)),
    value_last = CASE WHEN excluded.last_step >= last_step THEN excluded.value_last ELSE value_last END,
    last_step = max(last_step, excluded.last_step),
    lr_count = lr_count + excluded.lr_count,
    lr_sum = lr_sum + excluded.lr_sum
"""
_ADD_SQL = "INSERT INTO rollups VALUES " + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?,?)"] * len(LEVELS)) + _UPSERT_TAIL


def _clean(x: float | None) -> float | None:
    """None for a missing or NaN value (SQLite stores NaN as NULL); the float otherwise."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def add(c: sqlite3.Connection, series: int, global_step: int, value: float | None,
        learning_rate: float | None = None) -> None:
    """Fold one new row into every level (one statement). Call inside the writer's transaction."""
    v, lr = _clean(value), _clean(learning_rate)
    params: list = []
    for level in LEVELS:
        params += [series, level, global_step >> level, 1, global_step, int(v is not None), v or 0.0, v, v,
                   global_step, v, int(lr is not None), lr or 0.0]
    c.execute(_ADD_SQL, params)


def _block_range(level: int, block: int) -> tuple[int, int]:
    return block << level, ((block + 1) << level) - 1


def rebuild_block(c: sqlite3.Connection, series: int, global_step: int) -> None:
    """Recompute, at every level, the block holding ``global_step`` from the rows below it (raw rows for
    the finest level, the finer level's blocks above it); a block left empty is deleted."""
    table, value, lr = _SOURCES[series]
    previous = None
    for level in LEVELS:
        block = global_step >> level
        lo, hi = _block_range(level, block)
        if previous is None:
            row = c.execute(
                f"SELECT COUNT(*), SUM(global_step), COUNT({value}), "
                f"CASE WHEN COUNT({value}) = 0 THEN 0.0 ELSE SUM({value}) END, MIN({value}), MAX({value}), "
                f"MAX(global_step), COUNT({lr}), CASE WHEN COUNT({lr}) = 0 THEN 0.0 ELSE SUM({lr}) END "
                f"FROM {table} WHERE global_step BETWEEN ? AND ?", (lo, hi)).fetchone()
            last = c.execute(f"SELECT {value} FROM {table} WHERE global_step BETWEEN ? AND ? "
                             "ORDER BY global_step DESC, rowid DESC LIMIT 1", (lo, hi)).fetchone()
        else:
            shift = level - previous
            blo, bhi = block << shift, ((block + 1) << shift) - 1
            row = c.execute("SELECT SUM(n), SUM(step_sum), SUM(value_count), SUM(value_sum), MIN(value_min), "
                            "MAX(value_max), MAX(last_step), SUM(lr_count), SUM(lr_sum) FROM rollups "
                            "WHERE series=? AND level=? AND block BETWEEN ? AND ?",
                            (series, previous, blo, bhi)).fetchone()
            last = c.execute("SELECT value_last FROM rollups WHERE series=? AND level=? AND block BETWEEN ? AND ? "
                             "ORDER BY last_step DESC LIMIT 1", (series, previous, blo, bhi)).fetchone()
        if not row[0]:
            c.execute("DELETE FROM rollups WHERE series=? AND level=? AND block=?", (series, level, block))
        else:
            n, step_sum, vc, vs, vmin, vmax, last_step, lc, ls = row
            c.execute("INSERT OR REPLACE INTO rollups VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                      (series, level, block, n, step_sum, vc, vs, vmin, vmax, last_step, last[0], lc, ls))
        previous = level


def truncate_after(c: sqlite3.Connection, global_step: int) -> None:
    """After the raw rows above ``global_step`` were deleted: drop the blocks wholly above it and recompute
    the ones that straddle it."""
    for series in _SOURCES:
        for level in LEVELS:
            c.execute("DELETE FROM rollups WHERE series=? AND level=? AND block > ?",
                      (series, level, global_step >> level))
        if global_step >= 0:
            rebuild_block(c, series, global_step)


def rebuild_all(c: sqlite3.Connection) -> None:
    """Recompute every rollup from the raw rows, set-based (one scan of each raw table, then each level
    from the finer one). For the migration of an existing ledger and for bulk imports."""
    c.execute("DELETE FROM rollups")
    first = LEVELS[0]
    for series, (table, value, lr) in _SOURCES.items():
        c.execute(
            f"INSERT INTO rollups SELECT ?, ?, global_step >> {first}, COUNT(*), SUM(global_step), COUNT({value}), "
            f"CASE WHEN COUNT({value}) = 0 THEN 0.0 ELSE SUM({value}) END, MIN({value}), MAX({value}), "
            f"MAX(global_step), NULL, COUNT({lr}), CASE WHEN COUNT({lr}) = 0 THEN 0.0 ELSE SUM({lr}) END "
            f"FROM {table} GROUP BY global_step >> {first}", (series, first))
        c.execute(f"UPDATE rollups SET value_last = (SELECT {value} FROM {table} t WHERE t.global_step = "
                  "rollups.last_step ORDER BY t.rowid DESC LIMIT 1) WHERE series=? AND level=?", (series, first))
        for previous, level in zip(LEVELS, LEVELS[1:], strict=False):
            shift = level - previous
            c.execute(f"INSERT INTO rollups SELECT series, ?, block >> {shift}, SUM(n), SUM(step_sum), "
                      "SUM(value_count), SUM(value_sum), MIN(value_min), MAX(value_max), MAX(last_step), NULL, "
                      "SUM(lr_count), SUM(lr_sum) FROM rollups WHERE series=? AND level=? "
                      f"GROUP BY block >> {shift}", (level, series, previous))
            c.execute(f"UPDATE rollups SET value_last = (SELECT r.value_last FROM rollups r WHERE r.series = "
                      f"rollups.series AND r.level = ? AND r.block = rollups.last_step >> {previous}) "
                      "WHERE series=? AND level=?", (previous, series, level))


# reading ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """How to answer a range: ``level`` None = raw scan with buckets counted from ``from_step``; else
    rollups of that level, buckets of ``bucket_steps`` (``2**level``, or a multiple of the coarsest level's
    block for a range too long for it) aligned to multiples of ``bucket_steps``."""

    level: int | None
    bucket_steps: int


def plan(from_step: int, to_step: int, max_points: int) -> Plan:
    """The plan for steps ``[from_step, to_step]`` in at most ``max_points`` buckets (see the module doc)."""
    span = max(1, to_step - from_step + 1)
    bucket = max(1, math.ceil(span / max_points))
    if span <= RAW_SCAN_MAX_STEPS:
        return Plan(None, bucket)
    level = next((lv for lv in LEVELS if (1 << lv) >= bucket), LEVELS[-1])
    size = 1 << level
    m = -(-bucket // size)
    while to_step // (m * size) - from_step // (m * size) + 1 > max_points:
        m += 1
    return Plan(level, m * size)


_AGGREGATES = "SUM(n) AS n, SUM(step_sum) AS step_sum, SUM(value_count) AS value_count, SUM(value_sum) AS " \
              "value_sum, MIN(value_min) AS value_min, MAX(value_max) AS value_max, SUM(lr_count) AS lr_count, " \
              "SUM(lr_sum) AS lr_sum"


@dataclass
class _Bucket:
    n: int = 0
    step_sum: int = 0
    value_count: int = 0
    value_sum: float | None = 0.0
    value_min: float | None = None
    value_max: float | None = None
    lr_count: int = 0
    lr_sum: float | None = 0.0

    def merge(self, n, step_sum, vc, vs, vmin, vmax, lc, ls) -> None:
        """Fold in another aggregate (the columns of :data:`_AGGREGATES`; all NULL for an empty one)."""
        if not n:
            return
        self.n += n
        self.step_sum += step_sum
        self.value_count += vc
        self.value_sum = None if vs is None or self.value_sum is None else self.value_sum + vs
        if vmin is not None:
            self.value_min = vmin if self.value_min is None else min(self.value_min, vmin)
        if vmax is not None:
            self.value_max = vmax if self.value_max is None else max(self.value_max, vmax)
        self.lr_count += lc
        self.lr_sum = None if ls is None or self.lr_sum is None else self.lr_sum + ls

    def means(self) -> tuple:
        """(mean step, mean value, min, max, mean learning rate): the columns of :data:`COLUMNS`."""
        return (self.step_sum / self.n,
                self.value_sum / self.value_count if self.value_count and self.value_sum is not None else None,
                self.value_min, self.value_max,
                self.lr_sum / self.lr_count if self.lr_count and self.lr_sum is not None else None)


def range_aggregate(c: sqlite3.Connection, series: int, lo: int, hi: int) -> _Bucket:
    """The aggregate of ``series`` over steps ``[lo, hi]``, exact, from the fewest rows: the coarsest whole
    blocks inside the range, then finer blocks for what is left at its two ends, then raw rows (fewer than
    ``2 * 2**LEVELS[0]``). At most two pieces are left at any level: about ``2 * len(LEVELS)`` small reads."""
    acc = _Bucket()
    pieces = [(lo, hi)] if lo <= hi else []
    for level in reversed(LEVELS):
        size, left = 1 << level, []
        for a, b in pieces:
            first, last = -(-a // size), (b + 1) // size - 1
            if first > last:
                left.append((a, b))
                continue
            acc.merge(*c.execute(f"SELECT {_AGGREGATES} FROM rollups WHERE series=? AND level=? AND block "
                                 "BETWEEN ? AND ?", (series, level, first, last)).fetchone())
            if a < first * size:
                left.append((a, first * size - 1))
            if (last + 1) * size <= b:
                left.append(((last + 1) * size, b))
        pieces = left
    table, value, lr = _SOURCES[series]
    for a, b in pieces:
        acc.merge(*c.execute(
            f"SELECT COUNT(*), SUM(global_step), COUNT({value}), CASE WHEN COUNT({value}) = 0 THEN 0.0 ELSE "
            f"SUM({value}) END, MIN({value}), MAX({value}), COUNT({lr}), CASE WHEN COUNT({lr}) = 0 THEN 0.0 "
            f"ELSE SUM({lr}) END FROM {table} WHERE global_step BETWEEN ? AND ?", (a, b)).fetchone())
    return acc


_MEANS = "CAST(step_sum AS REAL) / n, CASE WHEN value_count > 0 THEN value_sum / value_count END, value_min, " \
         "value_max, CASE WHEN lr_count > 0 THEN lr_sum / lr_count END"
COLUMNS = ("global_step", "value", "value_min", "value_max", "learning_rate")


def query(c: sqlite3.Connection, series: int, from_step: int, to_step: int, p: Plan) -> dict[str, list]:
    """Buckets of ``series`` over ``[from_step, to_step]`` by plan ``p`` (``p.level`` not None), in step
    order, as columns :data:`COLUMNS`: mean step, mean value, min, max, mean learning rate (a mean is None
    when the bucket has no value). The buckets in between are rollup rows read as they are (grouped only
    when ``bucket_steps`` exceeds the coarsest block); the two end buckets, usually partial, come from
    :func:`range_aggregate`."""
    assert p.level is not None
    size, width = 1 << p.level, p.bucket_steps
    first, last = from_step // width, to_step // width
    rows = []
    head = range_aggregate(c, series, from_step, min(to_step, (first + 1) * width - 1))
    if head.n:
        rows.append(head.means())
    if last > first + 1:
        m = width // size
        blocks = ((first + 1) * m, last * m - 1)
        cur = c.cursor()
        cur.row_factory = None  # plain tuples: the bulk of the answer
        if m == 1:
            cur.execute(f"SELECT {_MEANS} FROM rollups WHERE series=? AND level=? AND block BETWEEN ? AND ? "
                        "ORDER BY block", (series, p.level, *blocks))
        else:
            cur.execute(f"SELECT {_MEANS} FROM (SELECT {_AGGREGATES}, block / ? "
                        "AS k FROM rollups WHERE series=? AND level=? AND block BETWEEN ? AND ? GROUP BY k) "
                        "ORDER BY k", (m, series, p.level, *blocks))
        rows += cur.fetchall()
    if last > first:
        tail = range_aggregate(c, series, last * width, to_step)
        if tail.n:
            rows.append(tail.means())
    return {name: list(col) for name, col in zip(COLUMNS, zip(*rows, strict=True), strict=True)} if rows \
        else {name: [] for name in COLUMNS}
