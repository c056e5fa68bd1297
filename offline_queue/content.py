"""A batch file's content hash: one definition, fed in blocks, for every place that names a file
by its content (an upload through the API, a file a worker opens, a re-run of either). It is
over lines, not bytes, so line ends and a missing last newline do not change it.
(docs/ARCHITECTURE.md, Why the parts are as they are)
"""

from __future__ import annotations

import hashlib

_LF = b"\n"
_CR = b"\r"


class ContentHash:
    """sha256 of the content with every line ended by one `\\n` (CRLF and a missing final
    newline normalised), fed block by block so a 200 MB file never sits in memory."""

    __slots__ = ("_digest", "_ends_line", "_pending_cr")

    def __init__(self) -> None:
        self._digest = hashlib.sha256()
        self._pending_cr = False  # a block ended in \r: it may be the first half of \r\n
        self._ends_line = True  # nothing fed yet, or the last byte fed ended a line

    def update(self, block: bytes) -> None:
        if not block:
            return
        if self._pending_cr:
            block = _CR + block
            self._pending_cr = False
        if block.endswith(_CR):
            block = block[:-1]
            self._pending_cr = True
            if not block:
                return
        block = block.replace(b"\r\n", _LF)
        self._digest.update(block)
        self._ends_line = block.endswith(_LF)

    def hexdigest(self) -> str:
        digest = self._digest.copy()
        # The last line ends here: after no newline at all, or after a lone \r (as \r\n would).
        if self._pending_cr or not self._ends_line:
            digest.update(_LF)
        return digest.hexdigest()


def content_hash(data: bytes) -> str:
    """The content hash of bytes held in memory (tests, small inputs)."""
    h = ContentHash()
    h.update(data)
    return h.hexdigest()
