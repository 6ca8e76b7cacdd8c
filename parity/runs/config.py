"""What a run is asked to do, validated once, and the metadata every run file records about it."""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import platform
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from sd_parity.devices import check_syntax as check_device_syntax
from sd_parity.errors import BadInput
from sd_parity.impl.families import FAMILIES, detect_family
from sd_parity.impl.samplers import SAMPLERS
from sd_parity.threads import current_threads
from .selection import CaptureSpec, default_spec
from sd_parity.fixtures import FIXTURES, ensure_fixture, fixed_noise, folder_hash

PIPELINES = ("txt2img", "img2img", "inpaint")
SCHEDULERS = tuple(SAMPLERS)  # impl's samplers, each naming the diffusers scheduler it matches
DTYPES = ("fp32", "fp64", "fp16", "bf16")


@dataclass
class RunConfig:
    model: str
    prompt: str | list[str] = "a red cube"
    negative_prompt: str | list[str] | None = None
    steps: int = 4
    scheduler: str = "ddim"
    guidance: float = 7.5
    seed: int = 0
    height: int | None = None
    width: int | None = None
    dtype: str = "fp32"
    capture: str | None = None
    eta: float = 0.0
    karras: bool = False
    images_per_prompt: int = 1
    compression: str | None = None
    device: str = "cpu"  # torch device of the reference and the torch backend: cpu, cuda[:N], mps
    pipeline: str = "txt2img"
    init_image: str | None = None
    mask_image: str | None = None
    strength: float = 0.75
    # settings of the reference's scheduler changed from the model's scheduler_config.json (a port's
    # deliberate sampler choice, e.g. {"timestep_spacing": "trailing"}); impl's samplers read the same
    scheduler_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_types(self)
        if self.pipeline not in PIPELINES:
            raise BadInput(f"unknown pipeline {self.pipeline!r}; use one of {', '.join(PIPELINES)}")
        for text in (*self.prompts(), *(self.negative_prompts() or [])):
            _check_text(text)
        _check_numbers(self)
        if self.pipeline != "txt2img":
            self._check_images()
        if self.height is None or self.width is None:
            size = native_size(self.model)
            self.height = size if self.height is None else self.height
            self.width = size if self.width is None else self.width
        for side, value in (("height", self.height), ("width", self.width)):
            if value <= 0 or value % 8:
                raise BadInput(f"--{side} {value} is not a positive multiple of 8; SD's VAE downsamples by 8")
            if value > MAX_SIDE:
                raise BadInput(f"--{side} {value} is larger than {MAX_SIDE} pixels; SD runs at 512 to 1024")
        negatives = self.negative_prompts()
        if negatives is not None and len(negatives) != len(self.prompts()):
            raise BadInput(f"{len(negatives)} negative prompts for {len(self.prompts())} prompts; "
                           "give one --negative-prompt, or one per --prompt")
        if self.scheduler not in SCHEDULERS:
            raise BadInput(f"unknown scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)}")
        if self.dtype not in DTYPES:
            raise BadInput(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        check_device_syntax(self.device)  # availability is checked where torch runs (sd_parity.devices)
        if self.capture is not None:
            CaptureSpec.parse(self.capture)  # fail before any model is loaded
        if self.scheduler_overrides:
            _check_scheduler_overrides(self.scheduler, self.scheduler_overrides)

    def scheduler_config(self, base: dict) -> dict:
        """The model's scheduler config `base` with this run's overrides applied."""
        return {**base, **self.scheduler_overrides}

    def _check_images(self) -> None:
        if self.init_image is None:
            raise BadInput(f"{self.pipeline} needs --init-image")
        if not 0.0 < self.strength <= 1.0:  # NaN fails this too
            raise BadInput(f"--strength {self.strength} is outside (0, 1]: it is the fraction of the schedule to run")
        image = _open_image(self.init_image, "--init-image")
        if image.mode != "RGB":
            raise BadInput(f"--init-image {self.init_image} is {image.mode}, not RGB; convert it to RGB first")
        self.height = self.height or image.height
        self.width = self.width or image.width
        if (image.width, image.height) != (self.width, self.height):
            raise BadInput(f"--init-image is {image.width}x{image.height} but the run is {self.width}x{self.height}; "
                           "resize the image or pass matching --width/--height")
        if self.pipeline == "inpaint":
            if self.mask_image is None:
                raise BadInput("inpaint needs --mask")
            mask = _open_image(self.mask_image, "--mask")
            if mask.size != image.size:
                raise BadInput(f"--mask is {mask.width}x{mask.height} but --init-image is {image.width}x{image.height}; "
                               "they must be the same size")

    def load_images(self):
        """The init image (RGB) and mask (L) as PIL images, as both implementations receive them."""
        image = _open_image(self.init_image, "--init-image") if self.init_image else None
        mask = _open_image(self.mask_image, "--mask").convert("L") if self.mask_image else None
        return image, mask

    def model_dir(self) -> Path:
        """The diffusers folder behind --model: a fixture name (generated if needed) or a folder path."""
        if self.model in FIXTURES:
            return ensure_fixture(self.model)
        folder = Path(self.model)
        if not folder.exists():
            raise BadInput(f"--model {self.model!r} is neither a fixture ({', '.join(sorted(FIXTURES))}) "
                           "nor an existing model folder")
        if not folder.is_dir():
            raise BadInput(f"--model {self.model} is a file; pass a diffusers model folder "
                           "(single-file checkpoints are converted with `parity convert`)")
        parts = model_parts(folder)
        missing = [part for part in parts if not (folder / part).exists()]
        if missing:
            raise BadInput(f"model folder {folder} lacks {', '.join(missing)}; a diffusers folder of this "
                           f"model has {', '.join(parts)}")
        for component in detect_family(folder).folders:
            check_weight_files(folder / component)
        return folder

    def model_label(self) -> str:
        return self.model if self.model in FIXTURES else Path(self.model).resolve().name

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def negative_prompts(self) -> list[str] | None:
        """One negative prompt per prompt (a single one applies to all), or None for the empty prompt."""
        if self.negative_prompt is None:
            return None
        if isinstance(self.negative_prompt, str):
            return [self.negative_prompt] * len(self.prompts())
        return list(self.negative_prompt)

    def initial_noise(self, latent_channels: int = 4, scale: int = 8) -> np.ndarray:
        return fixed_noise(self.model_label(), self.height, self.width, self.seed,
                           batch=len(self.prompts()) * self.images_per_prompt,
                           latent_channels=latent_channels, scale=scale)

    def capture_spec(self, unet_parameters: int) -> str:
        return self.capture if self.capture is not None else default_spec(unet_parameters)


DEFAULT_SIDE = 512  # SD 1.x's size, for a folder whose configs do not say


def native_size(model: str) -> int:
    """The image side a model was made for: its UNet's sample_size (latent pixels) times the VAE's
    downsampling factor (2 per level after the first), read from the fixture's spec or the folder's
    unet/ and vae/ config.json (512 for SD 1.x, 768 for SD 2.x at 768 px, 1024 for SDXL)."""
    if model in FIXTURES:
        unet, vae = FIXTURES[model]["unet"], FIXTURES[model]["vae"]
    else:
        unet, vae = (_json_or_empty(Path(model) / part / "config.json") for part in ("unet", "vae"))
    sample_size = unet.get("sample_size")
    levels = len(vae.get("block_out_channels") or (0, 0, 0, 0))
    if isinstance(sample_size, (list, tuple)):  # some configs give [height, width]
        sample_size = sample_size[0] if sample_size else None
    if not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size <= 0:
        return DEFAULT_SIDE
    return sample_size * 2 ** (levels - 1)


def _json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a missing or broken folder is reported by model_dir(), with what to do
    return data if isinstance(data, dict) else {}


MAX_SIDE = 8192  # pixels: far beyond any SD model, and a bound on what a typo can allocate
MAX_STEPS = 1000  # the schedulers' training timesteps: no sampler can take more steps
MAX_SEED = 2**63 - 1


def _check_types(config: RunConfig) -> None:
    """Every field has the type its annotation says (Python API callers and config files can pass anything)."""
    hints = typing.get_type_hints(RunConfig)
    for item in fields(config):
        value = getattr(config, item.name)
        if not _is_a(value, hints[item.name]):
            raise BadInput(f"RunConfig.{item.name} is {value!r} ({type(value).__name__}); expected "
                           f"{_describe(hints[item.name])}")


def _is_a(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, option) for option in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and bool(value) and all(_is_a(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)
    if origin is typing.Literal:
        return any(value == option and type(value) is type(option) for option in typing.get_args(hint))
    if hint is typing.Any or hint is inspect.Parameter.empty:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return f"a non-empty list of {typing.get_args(hint)[0].__name__}"
    if typing.get_origin(hint) is dict:
        return "a dict with string keys"
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(json.dumps(option) for option in typing.get_args(hint))
    return "None" if hint is type(None) else f"{'an' if hint is int else 'a'} {hint.__name__}"


def parse_scheduler_setting(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` of --scheduler-config: VALUE is read as JSON (true, 0, 0.5, null, [..]), else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise BadInput(f"--scheduler-config {text!r} is not KEY=VALUE (e.g. timestep_spacing=trailing)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def format_scheduler_setting(key: str, value: Any) -> str:
    """The `KEY=VALUE` that parse_scheduler_setting reads back as (key, value)."""
    text = f"{key}={value}" if isinstance(value, str) else f"{key}={json.dumps(value)}"
    return text if parse_scheduler_setting(text) == (key, value) else f"{key}={json.dumps(value)}"


def _check_scheduler_overrides(sampler: str, overrides: dict[str, Any]) -> None:
    """Each override names a setting of the sampler's diffusers scheduler and has that setting's type."""
    from sd_parity.errors import require_extra

    require_extra("--scheduler-config (it is checked against the reference's scheduler class)")
    import diffusers

    class_name = SAMPLERS[sampler].reference[0]
    parameters = {name: p.annotation for name, p in
                  inspect.signature(getattr(diffusers, class_name).__init__).parameters.items() if name != "self"}
    for key, value in overrides.items():
        if key not in parameters:
            raise BadInput(f"--scheduler-config {key}: {class_name} (sampler {sampler!r}) has no setting {key!r}; "
                           f"its settings: {', '.join(parameters)}")
        if not _is_a(value, parameters[key]):
            raise BadInput(f"--scheduler-config {key}={json.dumps(value)}: {class_name}'s {key} must be "
                           f"{_describe(parameters[key])}")


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise BadInput(f"prompt '{shown}' is not valid UTF-8 (the shell passed bytes that are no text); "
                       "give the prompt as UTF-8") from None


def _check_numbers(config: RunConfig) -> None:
    if config.steps < 1:
        raise BadInput(f"--steps {config.steps} must be at least 1")
    if config.steps > MAX_STEPS:
        raise BadInput(f"--steps {config.steps} is more than SD's schedule has timesteps (num_train_timesteps="
                       f"{MAX_STEPS}); use at most {MAX_STEPS}")
    if not 1 <= config.images_per_prompt <= 64:
        raise BadInput(f"--images-per-prompt {config.images_per_prompt} is outside 1..64")
    if not 0 <= config.seed <= MAX_SEED:
        raise BadInput(f"--seed {config.seed} is outside 0..{MAX_SEED} (2**63 - 1); seeds are non-negative")
    for option, value in (("--guidance", config.guidance), ("--eta", config.eta), ("--strength", config.strength)):
        if not math.isfinite(value):
            raise BadInput(f"{option} {value} is not a finite number")
    if config.eta < 0:
        raise BadInput(f"--eta {config.eta} is negative; DDIM's eta is 0 (deterministic) to 1 (DDPM-like)")


def _open_image(path: str, option: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise BadInput(f"{option} {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise BadInput(f"{option} {path} is not a readable image ({exc})") from None
    return image


def model_parts(folder: Path) -> tuple[str, ...]:
    """What a diffusers folder of the family its model_index.json names holds (the family registry's
    component and tokenizer folders); SD 1.x and 2.x, told apart by their text encoders, hold the same."""
    index = folder / "model_index.json"
    try:
        pipeline = json.loads(index.read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError):
        pipeline = None
    family = next((f for f in FAMILIES.values() if pipeline in f.pipelines.values()), None)
    if family is None:
        if not index.exists():
            raise BadInput(f"model folder {folder} lacks model_index.json; pass a diffusers model folder")
        detect_family(folder)  # raises: no known family's pipeline
    return ("model_index.json", "scheduler", *family.folders, *family.tokenizers)


def check_weight_files(component_dir: Path) -> None:
    """Refuse a component whose weights are missing or truncated, before a library fails obscurely on it."""
    from sd_parity.impl.tensor_files import open_component

    open_component(component_dir)  # parses every header and checks the data fits the file


def unet_parameter_count(model_dir: Path) -> int:
    """Parameters of the folder's UNet (memory-mapped: no weights are read)."""
    from sd_parity.impl.tensor_files import open_component

    return sum(int(array.size) for array in open_component(model_dir / "unet").values())


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("sd-parity", "numpy", "h5py", "torch", "diffusers", "transformers"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def x_t_sha256(x_t) -> str:
    """sha256 of x_T's values as float32 C-order bytes, whatever dtype holds them (run-format.md)."""
    return hashlib.sha256(np.ascontiguousarray(x_t, dtype=np.float32).tobytes()).hexdigest()


def run_metadata(config: RunConfig, *, impl: str, model_dir: Path, x_t: np.ndarray,
                 scheduler_config: dict, mode: str = "free") -> dict:
    return {
        **asdict(config),
        "impl": impl,
        "mode": mode,
        "model_path": str(model_dir.resolve()),
        "model_hash": folder_hash(model_dir),
        "scheduler_config": _stable(json.loads(json.dumps(scheduler_config, default=str))),
        "x_T_sha256": x_t_sha256(x_t),
        "threads": current_threads(),  # with the device, decides the kernels and so the reduction order
        "versions": library_versions(),
    }


def _stable(scheduler_config: dict) -> dict:
    """diffusers lists `_use_default_values` from a set, in an order that changes from process to process."""
    if isinstance(scheduler_config.get("_use_default_values"), list):
        scheduler_config["_use_default_values"] = sorted(scheduler_config["_use_default_values"])
    return scheduler_config
