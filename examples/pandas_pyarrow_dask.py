"""pandas, pyarrow and Dask reading one Parquet dataset through ``mlstore::``.

What it shows: a Parquet dataset of three files written with pandas to a chained
``mlstore::s3://...`` URL (each file replaces its object atomically), then read back
three ways, all through mlstore's filesystem (its cache, retries and version-pinned
reads): ``pandas.read_parquet("mlstore::s3://...")``, ``pyarrow.parquet.read_table`` with
the fsspec filesystem from ``fsspec.core.url_to_fs``, and
``dask.dataframe.read_parquet("mlstore::s3://...")`` on Dask's local scheduler. The
script exits non-zero unless the three frames equal the one written.

What it needs: ``pip install "mlstore[s3]" pandas pyarrow "dask[dataframe]"`` and a prefix
you can write to (the script deletes what it wrote).

Run it against a real bucket::

    python examples/pandas_pyarrow_dask.py s3://my-bucket/mlstore-examples/tables

or set ``EXAMPLE_URL`` instead of the argument. ``nox -s examples`` runs it against a
local S3 emulator (moto_server), set through ``MLSTORE_S3_ENDPOINT_URL`` and ``AWS_*``.
"""

from __future__ import annotations

import os
import sys

import dask
import dask.dataframe as dd
import fsspec
import pandas as pd
import pyarrow.parquet as pq

import mlstore


def canonical(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by id, a plain index, the written column types: frames compare by content."""
    return df.sort_values("id").reset_index(drop=True).astype({"label": "object"})


def main(root: str) -> None:
    root = root.rstrip("/")
    table = f"mlstore::{root}/table"
    parts = [
        pd.DataFrame(
            {
                "id": range(p * 100, (p + 1) * 100),
                "label": [f"class-{i % 7}" for i in range(100)],
                "score": [i / 100 for i in range(100)],
            }
        )
        for p in range(3)
    ]
    for p, part in enumerate(parts):
        part.to_parquet(f"{table}/part-{p}.parquet", index=False)
    written = canonical(pd.concat(parts))

    by_pandas = canonical(pd.read_parquet(table))
    print(f"pandas:  {len(by_pandas)} rows")

    fs, path = fsspec.core.url_to_fs(table)
    by_pyarrow = canonical(pq.read_table(path, filesystem=fs).to_pandas())
    print(f"pyarrow: {len(by_pyarrow)} rows, filesystem {type(fs).__name__}")

    with dask.config.set(scheduler="threads"):
        frame = dd.read_parquet(table)
        print(f"dask:    {frame.npartitions} partitions")
        by_dask = canonical(frame.compute())

    for name, df in (("pandas", by_pandas), ("pyarrow", by_pyarrow), ("dask", by_dask)):
        pd.testing.assert_frame_equal(df, written, check_dtype=False, obj=name)
    print("all three frames equal the one written")

    mlstore.rm(root, recursive=True)
    print("pandas_pyarrow_dask: OK")


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_URL")
    sys.exit(main(url) if url else __doc__)  # no URL: print the header, exit 1
