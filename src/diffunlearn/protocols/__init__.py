"""Evaluation protocols: what a benchmark measures of a model, as library code the benchmarks and commands share.

- :mod:`.toy`: noise predictions against the exact ideal denoisers of X and X \\ A on 8x8 digits (``bench toy``);
- :mod:`.mnist_tshirt`: the SISS paper's MNIST T-Shirt metrics (``eval``, ``demo``, ``bench mnist-tshirt``);
- :mod:`.instance`: forgetting one training image: targets, noise-and-denoise similarity, NLL, membership, the strip
  (``bench instance``);
- :mod:`.prompt`: a memorised prompt: memorised counts while unlearning and the paper's success (``prompt unlearn``,
  ``bench prompt``);
- :mod:`.calibration`: SISS's scaling_norm by the paper's rule (10% of ||G_x||), measured at the starting model.
"""
