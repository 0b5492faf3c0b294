"""Unlearning and quality metrics: exact NLL, target rate, domain-classifier IS/FID, membership inference,
noise-and-denoise similarity.

Names are re-exported lazily, so ``import diffunlearn.metrics`` stays cheap and ``python -m
diffunlearn.metrics.classifier`` does not import its own module twice.
"""

from importlib import import_module

_EXPORTS = {
    "nll": ("NLLResult", "nll_bits_per_dim"),
    "rates": ("TargetRate", "binomial_ci", "target_rate"),
    "classifier": ("DomainClassifier", "build_mnist_tshirt_classifier_data", "classifier_fid",
                   "classifier_inception_score", "load_classifier", "run_train_classifier", "save_classifier",
                   "train_classifier"),
    "membership": ("MembershipResult", "denoising_losses", "loss_auc", "membership_auc"),
    "similarity": ("PixelCosine", "SSCD", "SimilarityResult", "load_similarity", "noise_and_denoise",
                   "noise_and_denoise_similarity"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)
