"""The hand-over of one image to its encoder while its rows are still being made (the thread protocol between
the finishing worker that marks bands and the encoder thread that compresses them)."""

from __future__ import annotations

import threading

import numpy as np


class RowFeed:
    """One image handed to its encoder while its rows are still being made. The maker marks bands of rows
    final, in any order (rows_ready), then ends with finish(), or finish(replacement) to have another image
    written instead, or cancel(); the encoder takes the final rows in order as soon as there are any."""

    def __init__(self, image: np.ndarray):
        self.image = image  # (H, W, 3) uint8 RGB, filled in by the maker
        self._changed = threading.Condition()
        self._ready = 0  # rows 0.._ready are final
        self._waiting_bands: dict[int, int] = {}  # final bands below a gap: top -> bottom
        self._end: tuple[bool, np.ndarray | None] | None = None  # (cancelled, replacement) once ended

    def rows_ready(self, top: int, bottom: int) -> None:
        with self._changed:
            self._waiting_bands[top] = bottom
            while self._ready in self._waiting_bands:
                self._ready = self._waiting_bands.pop(self._ready)
            self._changed.notify_all()

    def finish(self, replacement: np.ndarray | None = None) -> None:
        self._end_with(False, replacement)

    def cancel(self) -> None:
        self._end_with(True, None)

    def final_rows(self, after: int) -> int:
        """Waits until more than `after` rows are final, or the maker has ended; the number final so far."""
        with self._changed:
            self._changed.wait_for(lambda: self._ready > after or self._end is not None)
            return self._ready

    def end(self) -> tuple[bool, np.ndarray | None]:
        """Waits for the maker's end: (cancelled, the replacement image or None)."""
        with self._changed:
            self._changed.wait_for(lambda: self._end is not None)
            return self._end

    def _end_with(self, cancelled: bool, replacement: np.ndarray | None) -> None:
        with self._changed:
            self._end = (cancelled, replacement)
            self._changed.notify_all()
