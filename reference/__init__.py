"""The reference side: the real diffusers/transformers Stable Diffusion pipeline, with capture hooks."""
import os

from sd_parity.errors import require_extra

require_extra("the reference (diffusers' pipelines)")

# transformers announces optional image-processor fallbacks at import; they are irrelevant to text encoding.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
