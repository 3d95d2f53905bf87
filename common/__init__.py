"""Shared package of the generative MONAI bundles (brain_t1_ldm, flair_to_t1_controlnet, cxr_ldm, brain_unclip).

Nothing here is bundle-specific: bundles reach it from their configs as ``common.<module>``.
"""

__version__ = "0.1.0"
