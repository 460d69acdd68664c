"""What a request is made of, checked before any work: inputs to a GenerationRequest, images and masks, the
files Cog downloaded for it."""
