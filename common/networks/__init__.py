"""Networks: architectures recorded with weights, text encoders and tokenizer, ControlNet, FID feature networks."""
