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

from neurocube.sources.parquet import lazy_columns, plan_chunks
from neurocube.sources.parquet_meta import read_parquet_info
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


def _footer_damaged(tmp_path: Path, find: bytes, offset: int, value: int) -> Path:
    """A copy of the first sample (rewritten with page CRCs) with one footer byte set."""
    source = tmp_path / "source.parquet"
    pq.write_table(pq.read_table(SAMPLES[0]), source, write_page_checksum=True)
    data = bytearray(source.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    at = data.index(find, footer_start) + offset
    data[at] = value
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(bytes(data))
    return damaged


def _rewritten(tmp_path: Path) -> Path:
    """The first sample rewritten with page CRCs (as neurocube's writers write)."""
    source = tmp_path / "source.parquet"
    if not source.exists():
        pq.write_table(pq.read_table(SAMPLES[0]), source, write_page_checksum=True)
    return source


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _footer_value_replaced(tmp_path: Path, header: bytes, old: int, new: int) -> Path:
    """A copy of the first sample whose footer holds ``new`` where it held the integer ``old``
    after the compact-protocol field ``header`` (both encodings the same length)."""
    data = _rewritten(tmp_path).read_bytes()
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    before, after = header + _varint(2 * old), header + _varint(2 * new)  # zigzag, positive
    assert len(before) == len(after) and data.count(before, footer_start) == 1
    damaged = tmp_path / "damaged.parquet"
    damaged.write_bytes(data[:footer_start] + data[footer_start:].replace(before, after))
    return damaged


@pytest.mark.parametrize(
    ("find", "offset", "value", "message"),
    [
        # the schema's type of 'subject' (BYTE_ARRAY, zigzag 0x0c) zeroed into BOOLEAN
        (b"\x15\x0c%\x02\x18\x07subject", 1, 0, "is BOOLEAN in the schema but its chunk"),
        # its repetition (OPTIONAL) zeroed into REQUIRED: the level histogram no longer fits
        (b"\x15\x0c%\x02\x18\x07subject", 3, 0, "definition-level histogram of 2 bins"),
        # a byte of a column's name in the schema: the chunks still name the old column
        (b"\x18\x0cwindow_index", 7, 0, "is named 'window_index' by its chunk"),
    ],
    ids=["type", "repetition", "name"],
)
def test_a_footer_that_disagrees_with_itself_is_refused(tmp_path, find, offset, value, message):
    """Found by a byte-by-byte scan: pyarrow *aborts the process* (a C++ exception through a
    noexcept frame) on the first two, and the third renamed a column, whose values then came
    back as NaN. Each is now a FormatError before pyarrow parses the footer."""
    from neurocube.errors import FormatError

    damaged = _footer_damaged(tmp_path, find, offset, value)
    columns = _numeric_columns(SAMPLES[0])
    with pytest.raises(FormatError, match=message) as caught:
        _read(damaged, columns)
    assert damaged.name in str(caught.value)


def test_a_footer_whose_row_count_or_page_offset_moved_is_refused(tmp_path):
    """Found by a byte-by-byte scan: a row group's row count changed in the footer read fewer
    rows, and a data page offset moved onto another column's pages read *those* pages, whose
    own CRCs pass. Both gave other values; both are now FormatErrors."""
    from neurocube.errors import FormatError

    meta = pq.read_metadata(_rewritten(tmp_path))
    columns = _numeric_columns(SAMPLES[0])
    group = meta.row_group(0)
    # RowGroup: total_byte_size (field 2), then num_rows (field 3): both i64, header 0x16
    rows_header = b"\x16" + _varint(2 * group.total_byte_size) + b"\x16"
    fewer = _footer_value_replaced(tmp_path, rows_header, group.num_rows, group.num_rows - 1)
    with pytest.raises(FormatError, match=f"holds {group.num_rows} values for "
                                          f"{group.num_rows - 1} rows"):
        _read(fewer, columns)
    # ColumnMetaData: total_compressed_size (7), then data_page_offset (9): header 0x26
    names = [group.column(j).path_in_schema for j in range(group.num_columns)]
    own = group.column(names.index("window_index"))
    other = group.column(names.index("embedding_0000"))
    moved = _footer_value_replaced(tmp_path, b"\x26", own.data_page_offset,
                                   other.data_page_offset)
    with pytest.raises(FormatError, match=r"first data page is at byte|, inside the chunk"):
        _read(moved, columns)
