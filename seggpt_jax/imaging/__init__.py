"""Images in and out: decoding, the mask-and-palette rule, the processor, output pictures."""
