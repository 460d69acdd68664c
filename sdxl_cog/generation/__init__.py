"""One generation: prompt encoding, the diffusers pipelines of each stage, samplers, decoding."""
