"""Pure-PyTorch oracles, written equation by equation from the papers."""
