"""lorapipe: reproducible, incremental LoRA fine-tuning of Stable Diffusion.

Importing the package is cheap on purpose: no torch, no diffusers. Each stage module imports its
heavy dependencies itself, so Snakemake jobs that need no torch (manifest, captions, shards) start
in well under a second.
"""

__version__ = "0.1.0"
