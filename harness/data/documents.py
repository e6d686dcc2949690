"""Reading documents (the `text` column) out of parquet shards, in a fixed order."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

TEXT_COLUMN = "text"


def iter_documents(files: Sequence[Path]) -> Iterator[str]:
    """Every document of the files, file by file in the given order, row group by row group."""
    for batch in iter_document_batches(files):
        yield from batch


def iter_document_batches(files: Sequence[Path]) -> Iterator[list[str]]:
    """Documents one parquet row group at a time (bounded memory on large shards)."""
    import pyarrow.parquet as pq

    for path in files:
        parquet = pq.ParquetFile(path)
        for i in range(parquet.num_row_groups):
            table = parquet.read_row_group(i, columns=[TEXT_COLUMN])
            # Empty texts stay (as BOS-only documents, as upstream); only nulls are dropped.
            yield [t for t in table.column(TEXT_COLUMN).to_pylist() if t is not None]
