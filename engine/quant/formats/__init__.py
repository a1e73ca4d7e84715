"""Format math as pure functions of tensors: constants, quantize/dequantize, pack/unpack. Torch only; nothing here
knows about modules, checkpoints or models, so every function is testable on CPU against an independent oracle."""
