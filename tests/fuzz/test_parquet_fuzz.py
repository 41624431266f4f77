"""Fuzz: damaged parquet tables (the sample tracks and combined tables, generated files).

Each example damages a copy of one file at a hypothesis-chosen place and reads every row of
every column through neurocube's parquet layer (footer -> chunk plan -> Dask arrays). It must
give the pyarrow oracle's values or a neurocube error; files written with page CRCs (what
neurocube's writers write) must never give other values.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from neurocube.sources.parquet import lazy_columns, plan_chunks, read_parquet_info
from tests.fuzz.damage import assert_oracle_or_neurocube_error, damages, fuzz_settings

DATA = Path(__file__).parents[1] / "data"
SAMPLES = sorted(DATA.rglob("*.parquet"))
_COUNTER = itertools.count()


def _numeric_columns(path: Path) -> list[str]:
    schema = pq.read_schema(path)
    return [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]


def _oracle(path: Path, columns: list[str]) -> dict[str, np.ndarray]:
    table = pq.read_table(path, columns=columns)
    return {c: table.column(c).to_numpy(zero_copy_only=False).astype("float64") for c in columns}


def _read(path: Path, columns: list[str]) -> dict[str, np.ndarray]:
    info = read_parquet_info(path)
    dtypes = [info.dtypes.get(c, "float64") for c in columns]
    chunks = plan_chunks(info, columns, dtypes)
    arrays = lazy_columns(chunks, columns, dtypes)
    return {c: np.asarray(arrays[c].compute()).astype("float64") for c in columns}


def _generated(folder: Path) -> Path:
    rng = np.random.default_rng(11)
    n = 4_000
    table = pa.table({
        "frame": np.arange(n, dtype=np.int64),
        "x": rng.standard_normal(n),
        "y": rng.standard_normal(n).astype("float32"),
        "id": rng.integers(0, 3, n).astype(np.int32),
    })  # fmt: skip
    path = folder / "generated_crc.parquet"
    pq.write_table(table, path, row_group_size=1_000, write_page_checksum=True,
                   write_statistics=True, compression="snappy")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parquet-fuzz")
    out = []
    for sample in SAMPLES:
        columns = _numeric_columns(sample)
        out.append((sample, columns, _oracle(sample, columns), False))
    generated = _generated(folder)
    columns = _numeric_columns(generated)
    out.append((generated, columns, _oracle(generated, columns), True))
    # a sample rewritten the way neurocube's writers write (page CRCs): checksummed
    for sample in SAMPLES[:1]:
        rewritten = folder / f"crc_{sample.name}"
        pq.write_table(pq.read_table(sample), rewritten, write_page_checksum=True)
        columns = _numeric_columns(rewritten)
        out.append((rewritten, columns, _oracle(rewritten, columns), True))
    return folder, out


def _run(files, damage, which):
    folder, entries = files
    source, columns, oracle, checksummed = entries[which % len(entries)]
    target = folder / f"damaged_{next(_COUNTER)}.parquet"
    shutil.copyfile(source, target)
    damage.apply_to(target)
    try:
        assert_oracle_or_neurocube_error(
            lambda: _read(target, columns), oracle, checksummed=checksummed,
            what=f"{source.name} with {damage}",
        )
    finally:
        target.unlink()


@fuzz_settings()
@given(damage=damages(), which=st.integers(0, 10))
def test_damaged_parquet_gives_oracle_values_or_a_neurocube_error(files, damage, which):
    _run(files, damage, which)


@pytest.mark.slow
@fuzz_settings(slow=True)
@given(damage=damages(), which=st.integers(0, 10))
def test_damaged_parquet_many(files, damage, which):
    _run(files, damage, which)


def test_damaged_column_name_in_the_footer_is_a_neurocube_error(files):
    """Found by the slow fuzz run: a flipped bit in the footer's column path made pyarrow raise
    a raw UnicodeDecodeError while neurocube counted the bytes it had read."""
    from tests.fuzz.damage import Damage

    _run(files, Damage(kind="flip_bit", where=0.25, size=1, bit=7, other=0.0), 0)
