"""Shared package of the generative MONAI bundles of this repository.

Nothing here is bundle- or modality-specific: bundles reach it from their configs as
``common.<subpackage>.<module>``, and give names, modalities and hints as config values.
"""

__version__ = "0.3.0"
