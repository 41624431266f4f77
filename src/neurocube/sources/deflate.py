"""Facts about the DEFLATE format (RFC 1951) that more than one reader relies on.

Nothing here reads a file or imports another neurocube module, so any source
module (the NIfTI header checks, the HDF5 metadata checks) can import it
without an import cycle.
"""

from __future__ import annotations

__all__ = ["DEFLATE_MAX_RATIO"]

#: The most bytes DEFLATE can inflate per compressed byte: a 258-byte match costs at
#: least 2 bits once the Huffman codes are set up, so about 1032:1 (a long run of one byte
#: value gets closest). Any deflated data, whether a gzip member, a zlib stream or an HDF5
#: chunk, declaring more output than its compressed size times this cannot hold it: the
#: declaration (a header field, a dataspace) is damaged.
DEFLATE_MAX_RATIO = 1032
