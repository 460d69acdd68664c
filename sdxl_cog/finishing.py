"""Finishing decoded images away from the thread that decodes them: the safety check, the invisible
watermark, the one copy to host memory and the hand-over to the encoder run in two worker threads while
the next image decodes.

On the CPU the workers run on the cores the decoder leaves free, when it leaves any: with more than one
torch intra-op thread the decoder already uses every core, and a worker's own OpenMP team would only contend
with it (measured: CPU predictions 1.7x slower), so then each image is finished in the calling thread, the
check before the watermark. On a GPU they queue their kernels on a stream of their own, which waits for the image's decode (an event) but not for the next one, so the
decoder's stream never waits for them either.

For each image the safety check and the watermark run at the same time (both only read the decoded
pixels); on the CPU the worker that ran the check then takes bands of the watermark too, so after the last
decode both cores mark the last image, and what remains is that, one copy and one encode. A
flagged image is replaced by black and the mark is embedded again, in the black image: a flagged output is
exactly what checking before marking would give.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from .safety import SafetyChecker, blacken_flagged
from .watermark import watermark_images

if TYPE_CHECKING:
    from .generate import ImageSink, Run

# One for the safety check of image i, one for its watermark and hand-over: jobs are taken in the order
# they were submitted, so a hand-over only ever waits for a check that is already running. The threads live
# as long as the process (started by the first request): none is started on a request's critical path.
WORKERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="finish")


class Finisher:
    """One request's images: submit each as it decodes, then collect them with results()."""

    def __init__(self, run: Run, checker: SafetyChecker | None, watermark: bool, sink: ImageSink | None):
        self.run, self.checker, self.watermark, self.sink = run, checker, watermark, sink
        self.stream = torch.cuda.Stream(run.device) if run.device.startswith("cuda") else None
        self.inline = run.device == "cpu" and torch.get_num_threads() > 1
        self.handovers: list[Future] = []
        self.jobs: list[Future] = []

    def submit(self, index: int, pixels: torch.Tensor) -> None:
        """Queue a decoded (1, H, W, 3) uint8 image, on the generation device, for finishing."""
        for handover in self.handovers:  # a failed image ends the request before the next decode
            if handover.done() and handover.exception() is not None:
                raise handover.exception()
        decoded = None
        if self.stream is not None:
            decoded = torch.cuda.Event()
            decoded.record()
        flag = self._start(self._check, pixels, decoded) if self.checker is not None else None
        self.handovers.append(self._start(self._finish, index, pixels, decoded, flag))
        self.jobs += [job for job in (flag, self.handovers[-1]) if job is not None]

    def results(self) -> tuple[list[np.ndarray], list[bool]]:
        """The finished host images and their safety flags, in order, once every one is handed over."""
        finished = [handover.result() for handover in self.handovers]
        return [image for image, _ in finished], [flagged for _, flagged in finished]

    def _start(self, job, *args) -> Future:
        if not self.inline:
            return WORKERS.submit(job, *args)
        done = Future()
        done.set_result(job(*args))
        return done

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

    def _mark(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.watermark:
            return pixels
        # The check's worker joins in once the check is done (on a GPU the image is marked in one pass).
        helpers = WORKERS if self.run.device == "cpu" and not self.inline else None
        with self.run.phase("watermark"):
            return watermark_images(pixels, helpers)

    def _finish(
        self, index: int, pixels: torch.Tensor, decoded: torch.cuda.Event | None, flag: Future | None
    ) -> tuple[np.ndarray, bool]:
        with self._after(decoded):
            marked = self._mark(pixels)
            flagged = flag is not None and flag.result()
            if flagged:
                marked = self._mark(blacken_flagged(pixels, [True]))
            # The only device-to-host copy of the image; on a GPU it waits for this stream alone.
            image = marked[0].cpu().numpy()
        if self.sink is not None:
            self.sink(index, image)
        return image, flagged

    def __enter__(self) -> Finisher:
        return self

    def __exit__(self, *exc_info) -> None:
        # On an error or a cancel, images not yet started are dropped (a check is never dropped once its
        # hand-over runs: it was taken first); running ones end first, so nothing reaches the sink after the
        # request has ended.
        for job in self.jobs:
            job.cancel()
        wait(self.jobs)
