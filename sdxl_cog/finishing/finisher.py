"""Finishing decoded images away from the thread that decodes them: the safety check, the invisible
watermark, the one copy to host memory and the hand-over to the encoder run in two worker threads while
the next image decodes.

On the CPU the workers run on the cores the decoder leaves free, when it leaves any: with more than one
torch intra-op thread the decoder already uses every core, and a worker's own OpenMP team would only contend
with it (measured: CPU predictions 1.7x slower), so then each image is finished in the calling thread, the
check before the watermark. On a GPU they queue their kernels on a stream of their own, which waits for
the image's decode (an event) but not for the next one, so the decoder's stream never waits for them either.

On a GPU, and for JPEG and WebP, each image's safety check and watermark run at the same time (both only
read the decoded pixels), and on the CPU the worker that ran the check then takes bands of the watermark
too. A PNG on the CPU is streamed instead: the image is marked band after band, and the encoder compresses
each band as soon as it is marked (outputs.BackgroundEncoder.stream), so after the last decode what remains
is the first band and about one encode; the check runs once the image is marked, beside the encoder. A
flagged image is replaced by black and the mark is embedded again, in the black image: a flagged output is
exactly what checking before marking would give, and the rows streamed before the verdict never reach a file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager

import numpy as np
import torch

from sdxl_cog.device.timing import PhaseTimer
from sdxl_cog.finishing.safety import SafetyChecker, blacken_flagged
from sdxl_cog.finishing.watermark import watermark_images
from sdxl_cog.outputs.rows import RowFeed

# Receives each finished image, (H, W, 3) uint8 RGB in host memory, with its index.
ImageSink = Callable[[int, np.ndarray], None]
# Takes an image before its rows are final (index, the array being filled in) and returns the feed to tell it
# which rows are (outputs.encoder.BackgroundEncoder.stream), or None: the image then goes to the ImageSink.
RowSink = Callable[[int, np.ndarray], RowFeed | None]

# One for the watermark and hand-over of image i, one for its safety check: jobs are taken in the order they
# were submitted, and a hand-over waits only for the check queued right after it, which the other worker takes
# once it ends what it runs (earlier jobs, which never wait for later ones). The threads live as long as the
# process (started by the first request): none is started on a request's critical path.
WORKERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="finish")


class Finisher:
    """One request's images: submit each as it decodes, then collect them with results()."""

    def __init__(
        self,
        run: PhaseTimer,
        checker: SafetyChecker | None,
        watermark: bool,
        sink: ImageSink | None,
        rows: RowSink | None = None,
    ):
        self.run, self.checker, self.watermark, self.sink, self.rows = run, checker, watermark, sink, rows
        self.stream = torch.cuda.Stream(run.device) if run.device.startswith("cuda") else None
        self.inline = run.device == "cpu" and torch.get_num_threads() > 1
        self.handovers: list[Future] = []
        # Per image: the check's job, the verdict its hand-over waits for, and the hand-over's go-ahead for it.
        self.checks: list[tuple[Future, Future, threading.Event]] = []

    def submit(self, index: int, pixels: torch.Tensor) -> None:
        """Queue a decoded (1, H, W, 3) uint8 image, on the generation device, for finishing."""
        for handover in self.handovers:  # a failed image ends the request before the next decode
            if handover.done() and handover.exception() is not None:
                raise handover.exception()
        decoded = None
        if self.stream is not None:
            decoded = torch.cuda.Event()
            decoded.record()
        if self.inline:  # the verdict first: the hand-over waits for it
            flag = _done(self._check, pixels, decoded) if self.checker is not None else None
            self.handovers.append(_done(self._finish, index, pixels, decoded, flag))
            return
        # The hand-over first: after the last decode, the watermark and the rows it streams to the encoder are
        # the longer path. When it streams (on the CPU), the check also waits until the image is marked: all
        # three need the GIL, and the (small, Python-bound) check beside the marking had slowed the bands and
        # the encoder they feed by several milliseconds; after it, the check still ends long before the encoder.
        flag, go_ahead = (Future(), threading.Event()) if self.checker is not None else (None, None)
        self.handovers.append(WORKERS.submit(self._finish, index, pixels, decoded, flag, go_ahead))
        if flag is not None:
            self.checks.append((WORKERS.submit(self._check_into, flag, go_ahead, pixels, decoded), flag, go_ahead))

    def results(self) -> tuple[list[np.ndarray], list[bool]]:
        """The finished host images and their safety flags, in order, once every one is handed over."""
        finished = [handover.result() for handover in self.handovers]
        return [image for image, _ in finished], [flagged for _, flagged in finished]

    @contextmanager
    def _after(self, decoded: torch.cuda.Event | None):
        """Run the block's device work on the finishing stream, after the image's decode."""
        if self.stream is None:
            with torch.inference_mode():
                yield
            return
        with torch.cuda.stream(self.stream), torch.inference_mode():
            self.stream.wait_event(decoded)
            yield

    def _check(self, pixels: torch.Tensor, decoded: torch.cuda.Event | None) -> bool:
        with self._after(decoded), self.run.phase("safety_check"):
            (flagged,) = self.checker.flags(pixels)
        return flagged

    def _check_into(
        self, flag: Future, go_ahead: threading.Event, pixels: torch.Tensor, decoded: torch.cuda.Event | None
    ) -> None:
        go_ahead.wait()
        try:
            flag.set_result(self._check(pixels, decoded))
        except BaseException as error:  # the hand-over raises it
            flag.set_exception(error)

    def _mark(
        self,
        pixels: torch.Tensor,
        out: torch.Tensor | None = None,
        on_band: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        if not self.watermark:
            return pixels
        # Without a feed, the check's worker joins in once the check is done (on a GPU the image is marked in
        # one pass); with one, the encoder's thread needs that core, and one thread marking band after band
        # keeps ahead of it.
        helpers = WORKERS if self.run.device == "cpu" and not self.inline and on_band is None else None
        with self.run.phase("watermark"):
            return watermark_images(pixels, helpers, out, on_band)

    def _open_feed(self, index: int, pixels: torch.Tensor) -> tuple[torch.Tensor | None, RowFeed | None]:
        """On the CPU, where marking is the longest part of finishing, the encoder takes each band of rows as
        soon as it is marked: the image to fill in, and its feed (None, None where that is not possible)."""
        if self.rows is None or not self.watermark or self.run.device != "cpu":
            return None, None
        out = torch.empty_like(pixels)
        feed = self.rows(index, out[0].numpy())
        return (out, feed) if feed is not None else (None, None)

    def _finish(
        self,
        index: int,
        pixels: torch.Tensor,
        decoded: torch.cuda.Event | None,
        flag: Future | None,
        go_ahead: threading.Event | None = None,
    ) -> tuple[np.ndarray, bool]:
        feed = None
        go_ahead = go_ahead or threading.Event()
        try:
            with self._after(decoded):
                out, feed = self._open_feed(index, pixels)
                if feed is None:
                    go_ahead.set()  # nothing to stream: the check runs beside the watermark
                marked = self._mark(pixels, out, feed.rows_ready if feed is not None else None)
                go_ahead.set()
                flagged = flag is not None and flag.result()
                if flagged:
                    marked = self._mark(blacken_flagged(pixels, [True]))
                # The only device-to-host copy of the image; on a GPU it waits for this stream alone.
                image = marked[0].cpu().numpy()
        except BaseException:
            go_ahead.set()
            if feed is not None:
                feed.cancel()
            raise
        if feed is not None:
            feed.finish(image if flagged else None)  # a flagged image's rows are dropped, the black one written
        elif self.sink is not None:
            self.sink(index, image)
        return image, flagged

    def __enter__(self) -> Finisher:
        return self

    def __exit__(self, *exc_info) -> None:
        # On an error or a cancel, images not yet started are dropped, and a hand-over waiting for a check that
        # never started stops waiting; running ones end first, so nothing reaches the sink after the request
        # has ended.
        for handover in self.handovers:
            handover.cancel()
        for check, flag, go_ahead in self.checks:
            go_ahead.set()  # its hand-over may never run
            if check.cancel():
                flag.cancel()
        wait(self.handovers + [check for check, _, _ in self.checks])


def _done(job, *args) -> Future:
    """`job` run in this thread, as a completed Future (or one holding its error)."""
    done = Future()
    try:
        done.set_result(job(*args))
    except BaseException as error:
        done.set_exception(error)
    return done
