"""Model families as data: what SD 1.x, SD 2.x and SDXL consist of, for impl/ and the harness alike.

A family lists
- its components: the networks a run file holds tensors of, under their run-file component names
  (text_encoder, text_encoder_2, unet, vae_encoder, vae_decoder); where each one's config and weights
  sit in a diffusers folder; which impl model computes it; its blocks (the units of isolated runs and
  of pytest ids) and how its module paths are laid out;
- its conditioning: the text embedders whose hidden states, concatenated on the channel axis, are the
  UNet's context (as tinygrad's and sgm's Conditioner build it), which of them gives the pooled text
  embedding, and the added conditions the UNet embeds besides the timestep (SDXL's text_time);
- its scheduler defaults (the scheduler_config.json its published checkpoints ship) and the diffusers
  pipeline classes that run it;
- how a diffusers folder is recognised as the family (`detect_family`).

Pure data and lookups over it, standard library only: impl/ builds its models and pipelines from it,
and the harness reads it (run-file component list, tensor naming and blocks, capture selection), so
nothing else lists components or blocks. docs/architecture.md says how to add a component or a family;
docs/families.md what each family's differences are and how they are checked.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ModelInputError

DIFFUSERS_VERSION = "0.42.1"  # written into the configs of generated fixtures


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Component:
    """One network of a family, as a run file, a diffusers folder and impl/ see it.

    `blocks` is a regular expression over module paths matching exactly the component's blocks, with
    the named groups `index` (the block's number), `direction` ("down"/"up", UNet and VAE blocks) and
    `mid` (the mid block): the pytest id of a block is `<test_stem>_block_<index>[_<direction>]`, or
    `<test_stem>_block_mid`. `top_prefix` is the module-path prefix under which the component's
    top-level modules sit (the VAE halves are subtrees of one AutoencoderKL; CLIPTextModelWithProjection
    keeps the transformer under `text_model.`). `subtrees` are the reference module's subtrees that form
    the component when several components share one module (the VAE's encoder and decoder halves)."""

    name: str  # run-file component name
    folder: str  # sub-folder of a diffusers model folder holding config.json and the weights
    model: str  # impl model: one of MODELS
    reference_class: tuple[str, str]  # (library, class) in model_index.json; what the reference loads
    weights_file: str  # the weights file name published folders use
    test_stem: str  # pytest id stem: clip_block_0, unet_block_1_down, ...
    blocks: str  # regex of the block module paths (see above)
    top_prefix: str = ""
    subtrees: tuple[str, ...] = ()


# impl models (impl/models.py maps each to its loader)
MODELS = ("clip_text", "clip_text_with_projection", "unet", "vae_encoder", "vae_decoder")

TEXT_ENCODER = Component(
    "text_encoder", "text_encoder", "clip_text", ("transformers", "CLIPTextModel"), "model.safetensors",
    "clip", r"^encoder\.layers\.(?P<index>\d+)$")
# SDXL's OpenCLIP bigG encoder, converted to transformers' CLIPTextModelWithProjection: the CLIP
# transformer sits under `text_model.`, the pooled-output projection is `text_projection`.
TEXT_ENCODER_2 = Component(
    "text_encoder_2", "text_encoder_2", "clip_text_with_projection",
    ("transformers", "CLIPTextModelWithProjection"), "model.safetensors",
    "text_encoder_2", r"^text_model\.encoder\.layers\.(?P<index>\d+)$", top_prefix="text_model.")
UNET = Component(
    "unet", "unet", "unet", ("diffusers", "UNet2DConditionModel"), "diffusion_pytorch_model.safetensors",
    "unet", r"^(?:(?P<direction>down|up)_blocks\.(?P<index>\d+)|(?P<mid>mid_block))$")
VAE_ENCODER = Component(
    "vae_encoder", "vae", "vae_encoder", ("diffusers", "AutoencoderKL"), "diffusion_pytorch_model.safetensors",
    "vae_encoder", r"^encoder\.(?:(?P<direction>down)_blocks\.(?P<index>\d+)|(?P<mid>mid_block))$",
    top_prefix="encoder.", subtrees=("encoder", "quant_conv"))
VAE_DECODER = Component(
    "vae_decoder", "vae", "vae_decoder", ("diffusers", "AutoencoderKL"), "diffusion_pytorch_model.safetensors",
    "vae_decoder", r"^decoder\.(?:(?P<direction>up)_blocks\.(?P<index>\d+)|(?P<mid>mid_block))$",
    top_prefix="decoder.", subtrees=("post_quant_conv", "decoder"))

# Every component of every family, in run-file order (a run file lists its own; see docs/run-format.md).
COMPONENTS: dict[str, Component] = {c.name: c for c in (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_ENCODER, VAE_DECODER)}


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextEmbedder:
    """One text encoder's contribution to the conditioning (one entry of a Conditioner's embedders).

    Its context is `hidden_states[hidden_layer]` of the encoder (hidden_states[0] is the embeddings'
    output, hidden_states[i] layer i's), passed through the encoder's final layer norm when
    `final_norm`: -1 with the norm is transformers' last_hidden_state (SD 1.x; SD 2.x too, whose
    converted OpenCLIP encoder already ends at the penultimate layer of the original), -2 without it is
    SDXL's penultimate layer. A pipeline's clip_skip k moves the layer to hidden_layer - k.
    With `pooled`, the encoder's pooled output (the final-normed state at the end-of-text token, through
    `text_projection` where the encoder has one) is the family's pooled text embedding.
    `pad_token` is what the family's published tokenizer pads with; impl reads the pad token of the
    folder's own tokenizer files (fixtures write this one). `token_ids` names the pipeline tensor of
    its token ids (`negative_<token_ids>` for the negative prompt's)."""

    component: str  # the text encoder's run-file component name
    tokenizer: str  # its tokenizer's folder
    hidden_layer: int = -1
    final_norm: bool = True
    pooled: bool = False
    pad_token: str = "<|endoftext|>"
    token_ids: str = "token_ids"


@dataclass(frozen=True)
class AddedConditions:
    """What the UNet embeds besides the timestep, passed as its `added_cond_kwargs`.

    `kind` is the UNet config's addition_embed_type. "text_time" (SDXL): {"text_embeds": the pooled text
    embedding, "time_ids": add_time_ids}, where add_time_ids is the concatenation of the (height, width)
    or (top, left) pairs named in `time_ids`, in that order; the UNet embeds each of the six numbers
    sinusoidally (addition_time_embed_dim wide), concatenates them after text_embeds, and adds the MLP
    of that (add_embedding) to the time embedding."""

    kind: str
    time_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Conditioning:
    """The family's Conditioner: embedders concatenated (in order) into the context, plus added conditions.

    `force_zeros_for_empty_prompt`: None where the family's pipeline has no such option; otherwise the
    pipeline's default (model_index.json's field of that name overrides it): when true and no negative
    prompt is given, the unconditional context and pooled embedding are zeros (no text encoder call)."""

    embedders: tuple[TextEmbedder, ...]
    added: AddedConditions | None = None
    force_zeros_for_empty_prompt: bool | None = None

    @property
    def pooled(self) -> TextEmbedder | None:
        """The embedder giving the pooled text embedding, if any."""
        return next((e for e in self.embedders if e.pooled), None)


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Marker:
    """`field` of the JSON file `file` (relative to the model folder) holds one of `values`."""

    file: str
    field: str
    values: tuple


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    components: tuple[Component, ...]
    conditioning: Conditioning
    scheduler: dict[str, Any]  # the published scheduler_config.json (fixtures write it)
    pipelines: dict[str, str]  # pipeline kind (txt2img, img2img, inpaint) -> diffusers pipeline class
    markers: tuple[Marker, ...]  # all hold for a folder of this family (detect_family)
    pipeline_options: dict[str, Any] = field(default_factory=dict)  # model_index.json fields besides components
    guidance_rescale: tuple[str, ...] = ("txt2img",)  # the pipeline kinds whose diffusers class has guidance_rescale
    # Storage dtypes at which the family's pipeline runs a VAE half at float32 when the VAE config's
    # force_upcast is true (SDXL: decoding at fp16; its img2img encodes at float32 whatever the dtype).
    vae_float32_at: dict[str, tuple[str, ...]] = field(default_factory=dict)
    notes: str = ""

    @property
    def component_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise ModelInputError(f"{self.title} has no component {name!r}; it has {', '.join(self.component_names)}")

    @property
    def folders(self) -> tuple[str, ...]:
        """The model sub-folders the family's networks load from, once each, in component order."""
        return tuple(dict.fromkeys(c.folder for c in self.components))

    @property
    def tokenizers(self) -> tuple[str, ...]:
        return tuple(e.tokenizer for e in self.conditioning.embedders)

    def model_index(self, pipeline: str | None = None) -> dict[str, Any]:
        """model_index.json of a folder of this family: the pipeline class (default: txt2img's), the
        pipeline options, the scheduler's and each component and tokenizer folder's class."""
        index = {"_class_name": pipeline or self.pipelines["txt2img"], "_diffusers_version": DIFFUSERS_VERSION,
                 **self.pipeline_options, "scheduler": ["diffusers", self.scheduler["_class_name"]]}
        index.update({c.folder: list(c.reference_class) for c in self.components})
        index.update({tokenizer: ["transformers", "CLIPTokenizer"] for tokenizer in self.tokenizers})
        return index


_SD_PIPELINES = {"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline",
                 "inpaint": "StableDiffusionInpaintPipeline"}
_SD_OPTIONS = {"feature_extractor": [None, None], "requires_safety_checker": False, "safety_checker": [None, None]}
_SD_SCHEDULE = {"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                "trained_betas": None}

SD1 = Family(
    name="sd1", title="SD 1.x",
    components=(TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER),
    conditioning=Conditioning((TextEmbedder("text_encoder", "tokenizer"),)),
    scheduler={"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **_SD_SCHEDULE},
    pipelines=_SD_PIPELINES,
    markers=(Marker("model_index.json", "_class_name", tuple(_SD_PIPELINES.values())),
             Marker("text_encoder/config.json", "hidden_act", ("quick_gelu",))),
    pipeline_options=_SD_OPTIONS,
    notes="OpenAI CLIP ViT-L/14 (quick_gelu), epsilon prediction, 1x1-conv transformer projections.",
)

SD2 = Family(
    name="sd2", title="SD 2.x",
    components=(TEXT_ENCODER, UNET, VAE_ENCODER, VAE_DECODER),
    # OpenCLIP ViT-H converted to CLIPTextModel without its last layer: its last_hidden_state is the
    # original's penultimate layer, final-normed. Its tokenizer pads with "!" (id 0), not end-of-text.
    conditioning=Conditioning((TextEmbedder("text_encoder", "tokenizer", pad_token="!"),)),
    scheduler={"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION, **_SD_SCHEDULE,
               "prediction_type": "v_prediction"},
    pipelines=_SD_PIPELINES,
    markers=(Marker("model_index.json", "_class_name", tuple(_SD_PIPELINES.values())),
             Marker("text_encoder/config.json", "hidden_act", ("gelu",))),
    pipeline_options=_SD_OPTIONS,
    notes="OpenCLIP ViT-H (gelu, '!' padding), v-prediction (768 px models), linear transformer "
          "projections, per-block attention heads, upcast_attention.",
)

SDXL = Family(
    name="sdxl", title="SDXL",
    components=(TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_ENCODER, VAE_DECODER),
    conditioning=Conditioning(
        (TextEmbedder("text_encoder", "tokenizer", hidden_layer=-2, final_norm=False),
         TextEmbedder("text_encoder_2", "tokenizer_2", hidden_layer=-2, final_norm=False, pooled=True,
                      pad_token="!", token_ids="token_ids_2")),
        added=AddedConditions("text_time", ("original_size", "crops_coords_top_left", "target_size")),
        force_zeros_for_empty_prompt=True),
    scheduler={"_class_name": "EulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION, **_SD_SCHEDULE,
               "interpolation_type": "linear", "prediction_type": "epsilon", "sample_max_value": 1.0,
               "timestep_spacing": "leading", "use_karras_sigmas": False},
    pipelines={"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline"},
    markers=(Marker("model_index.json", "_class_name",
                    ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")),),
    pipeline_options={"force_zeros_for_empty_prompt": True},
    guidance_rescale=("txt2img", "img2img"),
    vae_float32_at={"vae_decoder": ("fp16",), "vae_encoder": ("fp16", "bf16", "fp64")},
    notes="two text encoders (penultimate layers concatenated; pooled embedding from the second's "
          "projection), text_time micro-conditioning, 3 levels with per-level transformer depth.",
)

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL)}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ModelInputError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def detect_family(folder: str | Path) -> Family:
    """The family of a diffusers model folder: the one whose markers all hold (model_index.json's pipeline
    class, and for SD 1.x vs 2.x the text encoder's activation)."""
    folder = Path(folder)
    found: dict[tuple[str, str], Any] = {}

    def value(marker: Marker):
        key = (marker.file, marker.field)
        if key not in found:
            try:
                found[key] = json.loads((folder / marker.file).read_text()).get(marker.field)
            except (OSError, json.JSONDecodeError, AttributeError):
                found[key] = None
        return found[key]

    for candidate in FAMILIES.values():
        if all(value(m) in m.values for m in candidate.markers):
            return candidate
    seen = ", ".join(f"{file} {name}={v!r}" for (file, name), v in found.items())
    raise ModelInputError(f"{folder} is not a diffusers folder of a known family ({', '.join(FAMILIES)}); "
                          f"found {seen or 'nothing readable'}. A diffusers SD folder has model_index.json and "
                          "one sub-folder per component")


def block_test_id(component: Component, match) -> str:
    """The pytest id of the block a `component.blocks` match found."""
    groups = match.groupdict()
    if groups.get("mid"):
        return f"{component.test_stem}_block_mid"
    direction = groups.get("direction")
    return f"{component.test_stem}_block_{groups['index']}" + (f"_{direction}" if direction else "")


__all__ = ["COMPONENTS", "FAMILIES", "MODELS", "SD1", "SD2", "SDXL", "AddedConditions", "Component", "Conditioning",
           "Family", "Marker", "TextEmbedder", "block_test_id", "detect_family", "family"]
