"""Keep libpng/libjpeg messages about bad frames out of the daemon's log, and count them.

libpng and libjpeg print a line on the process's stderr (file descriptor 2) for each corrupt frame
OpenCV hands them ("libpng error: IDAT: CRC error", "Corrupt JPEG data: ..."), from C, with no hook
OpenCV exposes. The frame checks refuse most bad frames before a codec sees them (PNG chunk CRCs,
end markers, header sizes), but corrupt entropy-coded data can only be found by decoding it. So the
daemon process routes fd 2 through a pipe read by a thread: codec lines are counted (`count`, shown
in stats as `codec_messages`), every other line goes on to the real stderr unchanged.
"""

from __future__ import annotations

import os
import re
import sys
import threading

CODEC_LINE = re.compile(
    rb"^(libpng (warning|error)|Corrupt JPEG data|Premature end of JPEG|Invalid JPEG|Invalid SOS|Bogus |"
    rb"Huffman table|JPEG datastream|Not a JPEG file|Unsupported (JPEG|marker)|Warning: unknown JFIF|"
    rb"Inconsistent progression|Quantization table|Wrong JPEG library|Improper call|Empty input file|"
    rb"Application transferred too few|Corrupt JPEG|Missing Huffman|Sampling factors|Unsupported color|"
    rb"Invalid (component|crop|progressive|memory|color)|Maximum supported image dimension|"
    rb"\[ ?WARN:\S* global (grfmt_|loadsave))")


class CodecNoiseFilter:
    def __init__(self) -> None:
        self.count = 0
        self._saved: int | None = None
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._saved is not None

    def start(self) -> None:
        if self.active:
            return
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        self._saved = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._pump, args=(read_end, self._saved), daemon=True,
                                        name="edgeinspect-stderr")
        self._thread.start()

    def _pump(self, read_end: int, out: int) -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._line(line + b"\n", out)
            if pending:
                self._line(pending, out)

    def _line(self, line: bytes, out: int) -> None:
        if CODEC_LINE.match(line):
            self.count += 1
            return
        while line:
            line = line[os.write(out, line):]

    def stop(self) -> None:
        """Give fd 2 back to the real stderr (the pipe then ends and the thread forwards what was left)."""
        if not self.active:
            return
        sys.stderr.flush()
        os.dup2(self._saved, 2)  # closes the pipe's last write end
        self._thread.join(5)
        os.close(self._saved)
        self._saved = None


codec_noise = CodecNoiseFilter()  # one per process: fd 2 is
