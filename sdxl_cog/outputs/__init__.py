"""Output files: formats, the embedded generation parameters, the streamed PNG writer, the encoder threads, the
per-prediction directories, and sweeping what Cog leaves behind."""
