"""The SDXL checkpoints the server serves: one record per checkpoint, loading every module once, the GPU cache
of checkpoints, LoRA adapters on them, the page-cache prefetch that speeds up loading."""
