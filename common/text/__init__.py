"""CLIP tokenizer, frozen text encoders and prompt transforms."""
