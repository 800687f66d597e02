"""Columnar rows for plans: an immutable Batch of columns, and a RowSet viewing it through index vectors.

Operators share columns between RowSets and never copy them: sort, take and filter only build new
int64 index vectors over the same Batch, and only concat makes a new one.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

FLOAT = np.dtype(np.float64)
STRING = np.dtype(object)


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def _placeholders(n: int, string: bool) -> np.ndarray:
    return np.full(n, "", dtype=STRING) if string else np.full(n, np.nan)


@dataclass(frozen=True)
class Column:
    """Values with a validity mask; null slots hold a placeholder (NaN or "") that no result may depend on."""

    values: np.ndarray  # float64, or object holding Python str
    valid: np.ndarray  # bool, False = null

    def __post_init__(self) -> None:
        if self.values.dtype not in (FLOAT, STRING) or self.valid.dtype != bool:
            raise ValueError(f"a column holds float64 or object values and a bool mask, not {self.values.dtype}")
        if self.values.shape != self.valid.shape or self.values.ndim != 1:
            raise ValueError(f"column values {self.values.shape} and mask {self.valid.shape} differ")
        _frozen(self.values)
        _frozen(self.valid)

    @property
    def is_string(self) -> bool:
        return self.values.dtype == STRING

    @classmethod
    def nulls(cls, n: int, string: bool = False) -> "Column":
        return cls(_placeholders(n, string), np.zeros(n, dtype=bool))

    def take(self, index: np.ndarray) -> "Column":
        return Column(self.values[index], self.valid[index])

    def scatter(self, index: np.ndarray, n: int) -> "Column":
        """This column placed at `index` in an n-row column that is null elsewhere."""
        values, valid = _placeholders(n, self.is_string), np.zeros(n, dtype=bool)
        values[index], valid[index] = self.values, self.valid
        return Column(values, valid)


@dataclass(frozen=True)
class Batch:
    """Immutable once built: arrays have writeable=False; operators share columns, never copy them."""

    ids: np.ndarray  # int64
    columns: Mapping[str, Column]

    def __post_init__(self) -> None:
        if self.ids.dtype != np.int64 or self.ids.ndim != 1:
            raise ValueError(f"batch ids must be a 1-d int64 array, not {self.ids.dtype}")
        for key, column in self.columns.items():
            if key == "id":
                raise ValueError("'id' is the batch's ids, not a column")
            if len(column.valid) != len(self.ids):
                raise ValueError(f"column {key!r} has {len(column.valid)} rows, the batch {len(self.ids)}")
        _frozen(self.ids)
        object.__setattr__(self, "columns", MappingProxyType(dict(self.columns)))

    @classmethod
    def build(cls, ids: Sequence[int], floats: Mapping[str, Sequence[float | None]] | None = None,
              strings: Mapping[str, Sequence[str | None]] | None = None) -> "Batch":
        """A batch from Python lists; None is null."""
        floats, strings = floats or {}, strings or {}
        if both := set(floats) & set(strings):
            raise ValueError(f"keys given as both float and string: {sorted(both)}")
        columns = {}
        for key, values in floats.items():
            columns[key] = Column(np.array([np.nan if v is None else float(v) for v in values], dtype=FLOAT),
                                  np.array([v is not None for v in values], dtype=bool))
        for key, values in strings.items():
            column = np.empty(len(values), dtype=STRING)  # np.array would turn a list of str into a '<U' array
            column[:] = ["" if v is None else str(v) for v in values]
            columns[key] = Column(column, np.array([v is not None for v in values], dtype=bool))
        return cls(np.array(ids, dtype=np.int64), columns)

    def with_column(self, key: str, column: Column) -> "Batch":
        """A new batch sharing ids and the other Column objects."""
        return Batch(self.ids, {**self.columns, key: column})

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class RowSet:
    """A view of a batch: `selection` picks the active rows, `order` is a permutation giving their order."""

    batch: Batch
    selection: np.ndarray | None = None  # int64 batch indices of the active rows, in logical order
    order: np.ndarray | None = None  # int64 batch indices in logical order, filtered by selection when both set

    def __post_init__(self) -> None:
        for index in (self.selection, self.order):
            if index is not None:
                _frozen(index)

    def active(self) -> np.ndarray:
        """int64 batch indices of the active rows, in logical order."""
        if self.order is None:
            return np.arange(len(self.batch), dtype=np.int64) if self.selection is None else self.selection
        if self.selection is None:
            return self.order
        member = np.zeros(len(self.batch), dtype=bool)
        member[self.selection] = True
        return self.order[member[self.order]]

    def __len__(self) -> int:
        return len(self.active())

    def column(self, key: str) -> Column:
        """The key's column aligned to active(); a missing key is all null. The column itself when nothing is hidden."""
        column = self.batch.columns.get(key)
        if column is None:
            return Column.nulls(len(self))
        if self.selection is None and self.order is None:
            return column
        return column.take(self.active())

    def with_column(self, key: str, column: Column) -> "RowSet":
        """Adds a column aligned to active() (as evaluate returns it); inactive rows are null in the batch."""
        if self.selection is not None or self.order is not None:
            column = column.scatter(self.active(), len(self.batch))
        return RowSet(self.batch.with_column(key, column), self.selection, self.order)

    def filter(self, keep: np.ndarray) -> "RowSet":
        """Keeps the active rows where the bool mask `keep` (aligned to active()) is True."""
        active = self.active()
        if keep.dtype != bool or keep.shape != active.shape:
            raise ValueError(f"filter takes a bool mask of {len(active)} rows, not {keep.dtype}{keep.shape}")
        return RowSet(self.batch, active[keep])

    def sort(self, key: str, descending: bool = False) -> "RowSet":
        """Stable sort of the active rows by key, nulls last; only `order` changes."""
        active = self.active()
        if key == "id":
            values, valid = self.batch.ids[active], np.ones(len(active), dtype=bool)
        else:
            column = self.column(key)
            values, valid = column.values, column.valid
        # Ranks of distinct values let strings sort descending too, and a single stable argsort keeps ties in place.
        distinct, rank = np.unique(values[valid], return_inverse=True)
        rank = len(distinct) - 1 - rank if descending else rank
        ranks = np.full(len(active), len(distinct), dtype=np.int64)
        ranks[valid] = rank
        ordered = active[np.argsort(ranks, kind="stable")]
        if self.selection is not None:
            # Inactive rows go after the active ones so that order stays a permutation of the batch.
            hidden = np.ones(len(self.batch), dtype=bool)
            hidden[active] = False
            ordered = np.concatenate([ordered, np.flatnonzero(hidden)])
        return RowSet(self.batch, self.selection, ordered)

    def take(self, count: int) -> "RowSet":
        """The first count active rows."""
        if count < 0:
            raise ValueError(f"take needs a count >= 0, not {count}")
        return RowSet(self.batch, self.active()[:count])

    def concat(self, other: "RowSet") -> "RowSet":
        """self's active rows then other's, in a new dense batch holding the union of their columns."""
        columns = {}
        for key in sorted(set(self.batch.columns) | set(other.batch.columns)):
            left, right = self.batch.columns.get(key), other.batch.columns.get(key)
            if left is not None and right is not None and left.is_string != right.is_string:
                raise ValueError(f"cannot concat key {key!r}: it is a string on one side and a float on the other")
            string = (left if left is not None else right).is_string
            parts = [rows.column(key) if key in rows.batch.columns else Column.nulls(len(rows), string)
                     for rows in (self, other)]
            columns[key] = Column(np.concatenate([p.values for p in parts]), np.concatenate([p.valid for p in parts]))
        ids = np.concatenate([self.batch.ids[self.active()], other.batch.ids[other.active()]])
        return RowSet(Batch(ids, columns))

    def records(self, keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """[{"id": 1, key: value, ...}] in active order, with only the non-null fields."""
        active = self.active()
        rows: list[dict[str, Any]] = [{"id": i} for i in self.batch.ids[active].tolist()]
        for key in sorted(self.batch.columns) if keys is None else keys:
            if key == "id" or key not in self.batch.columns:
                continue
            column = self.batch.columns[key]
            for row, value, valid in zip(rows, column.values[active].tolist(), column.valid[active].tolist(),
                                         strict=True):
                if valid:
                    row[key] = value
        return rows
