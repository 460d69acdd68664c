"""Each decoded image before it is encoded: the safety check, the invisible watermark and the hand-over, off the
decoding thread."""
