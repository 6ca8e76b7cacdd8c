"""The reference side: the real diffusers/transformers Stable Diffusion pipeline, with capture hooks."""
import os

# transformers announces optional image-processor fallbacks at import; they are irrelevant to text encoding.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
