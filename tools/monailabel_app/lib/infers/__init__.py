from .bundle_infer import BundleGenerationTask, BundleTranslationTask

__all__ = ["BundleGenerationTask", "BundleTranslationTask"]
