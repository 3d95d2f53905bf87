"""Data: datalists, the subject split, dict transforms, condition images; modality folders (``brain/``) hold phantoms and real-data preparation."""
