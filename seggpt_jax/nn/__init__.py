"""The model: ops, attention kernels, layers, encoder, painter, loss, input validation."""
