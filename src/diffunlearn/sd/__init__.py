"""Stable Diffusion v1.x: unlearning a memorised image from a prompt (SISS paper, section 5.3).

A text-conditional model with its prompt held fixed is an unconditional model (:class:`FixedPromptUNet`), so the
ordinary trainer and methods unlearn it unchanged, in VAE latent space. The pieces:

- :mod:`.pipeline`: load a local SD v1.x diffusers directory (safetensors only), encode a prompt, cache latents,
  sample with DDIM and classifier-free guidance, save the unlearned UNet as a full SD directory;
- :mod:`.memorisation`: label generated images memorised (A) or not (X \\ A) by k-means or by distance to a reference;
- :mod:`.quality`: CLIP-IQA when CLIP weights are local, otherwise a named weight-free sharpness proxy;
- :mod:`.detect`: Wen et al. (2024)'s text-conditional noise magnitude, which flags memorised prompts
  (``diffunlearn detect``);
- :mod:`.prompt`: what ``diffunlearn prompt build|unlearn|score`` run (counting and success:
  :mod:`diffunlearn.sd.protocol`; the command line: :mod:`diffunlearn.commands.prompt`);
- :mod:`.replica`: ``diffunlearn prompt train-replica``, the CPU replica of a memorised prompt (a tiny pixel-space
  text-conditional model without a VAE, shipped as ``prompt-digits``; ``diffunlearn bench prompt`` runs on it).

transformers is needed (``pip install 'diffunlearn[sd]'``); it is imported only when these commands run.
"""
