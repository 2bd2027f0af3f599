"""``lorasmith cache``: latent and text-encoder caches for the trainers, and the base-norm cache.

- :func:`lorasmith.ops.cache.latents.cache_latents`: VAE latents (``cache latents``);
- :func:`lorasmith.ops.cache.text.cache_text`: text-encoder outputs (``cache text``; Z-Image's Qwen3 in
  :mod:`lorasmith.ops.cache._qwen3` and :mod:`lorasmith.ops.cache._text_zimage`);
- :mod:`lorasmith.ops.cache.buckets`: aspect-ratio buckets as sd-scripts and musubi-tuner make them;
- :mod:`lorasmith.ops.cache.families`: per-family file names, keys and latent scaling;
- :mod:`lorasmith.ops.cache.vae`: a diffusers ``AutoencoderKL`` from a single-file checkpoint;
- :mod:`lorasmith.ops.cache.datasets`: image folders and sd-scripts dataset TOMLs.

The modules that need torch, diffusers or Pillow import them inside functions, so importing this package
stays cheap. diffusers, transformers and Pillow come with ``pip install 'lorasmith[cache]'``.
"""
