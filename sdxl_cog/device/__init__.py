"""The device the modules run on: where each module lives per stage (low-VRAM mode), GPU memory (budget, peak,
recovery), timing device work."""
