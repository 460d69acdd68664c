"""A model switch on the CPU machine: what a request for a checkpoint that is not resident pays, against
the disk-read floor.

    script/make-test-weights --size full --model other /tmp/sdxl-full-2    # once: base + a second checkpoint
    python bench/model_switch.py --weights /tmp/sdxl-full-2 [--repeat 3] [--cold]

The second checkpoint `other` has its own full-size UNet (5.1 GB in fp16) and shares the base's text
encoders (hard links, loaded once), so a switch to it moves one UNet. Variants, median of N, warm page cache
(--cold: dropped before floor and disk_load; the host may still cache the disk):
  floor        its UNet file read once with sendfile() to /dev/null: what no loader can beat
  disk_load    UNet2DConditionModel.from_pretrained (fp16) of that folder, then every page touched: a
               checkpoint loaded from disk on demand
  host_copy    the loaded UNet brought in by models.CheckpointCache with a mover that copies every tensor
               (on a GPU the copy is host -> device over PCIe; here host -> host memory, its CPU stand-in)
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coldstart import read_once, touch  # noqa: E402
from common import GIB, drop_page_cache, median, print_header, print_table, spread, timed  # noqa: E402

UNET = "unet/diffusion_pytorch_model.fp16.safetensors"


def copy_mover(module, to_device: bool) -> None:
    """The CPU stand-in for a copy to the device: every tensor's bytes copied once (and dropped on eviction)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = tensor.data.clone() if to_device else tensor.data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--model", default="other", help="the checkpoint switched to (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before floor and disk_load (root)")
    args = parser.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    from sdxl_cog.checkpoints.cache import CheckpointCache

    folder = args.weights / "models" / args.model
    unet_file = folder / UNET
    read_once([unet_file])  # warm the page cache once, so every variant starts alike
    if args.cold and not drop_page_cache():
        parser.error("--cold needs root (writes /proc/sys/vm/drop_caches)")
    times: dict[str, list[float]] = {"floor": [], "disk_load": [], "host_copy": []}
    size = unet_file.stat().st_size
    for _ in range(args.repeat):
        if args.cold:
            drop_page_cache()
        times["floor"].append(timed(lambda: read_once([unet_file]))[0])
        if args.cold:
            drop_page_cache()

        def load():
            unet = UNet2DConditionModel.from_pretrained(folder / "unet", variant="fp16", dtype=torch.float16)
            touch([unet])
            return unet

        seconds, unet = timed(load)
        times["disk_load"].append(seconds)
        # A budget of 0: nothing is brought in at construction, the switch does it.
        cache = CheckpointCache({args.model: [unet]}, [], 0, copy_mover)
        times["host_copy"].append(timed(lambda cache=cache: cache.use(args.model))[0])
        del unet, cache
        gc.collect()

    cache_state = "cold" if args.cold else "warm"
    print_header(
        f"Model switch, CPU, {cache_state} page cache", {"UNet file": f"{size / GIB:.2f} GiB", "repeat": args.repeat}
    )
    floor = median(times["floor"])
    rows = [
        [
            name,
            spread(values),
            f"{size / GIB / median(values):.2f}",
            f"{median(values) / floor:.1f}x",
        ]
        for name, values in times.items()
    ]
    print_table(["variant", "median (min-max)", "GiB/s", "vs floor"], rows)


if __name__ == "__main__":
    sys.exit(main())
