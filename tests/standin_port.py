"""A stand-in for a port in another language, driven by `parity run --candidate-cmd` through files only.

    python standin_port.py run-block COMPONENT BLOCK INPUTS OUTPUTS CONFIG
    python standin_port.py run CONFIG OUTPUT

It does what a Rust or C++ port would do: reads the .npy files of the inputs folder (no run.json
needed), computes with its own code (here impl/'s NumPy backend, with the porting bug named by the
STANDIN_FAULT environment variable, if any), and writes plain .npy files. STANDIN_ONLY=unet,... limits
the components it runs alone (exit 3 for the others). Free mode writes no run.json
and names its files `<order>__<name>.npy`, the manifest-free convention. STANDIN_MODE=crash,
empty or wrong_batch makes it misbehave in those ways, to test the harness's error messages.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def load_config(path: str):
    from sd_parity.runs.config import RunConfig

    fields = json.loads(Path(path).read_text())
    known = RunConfig.__dataclass_fields__
    return RunConfig(**{k: v for k, v in fields.items() if k in known}), Path(fields["model"])


def port(config, model_dir):
    from sd_parity.candidates.impl import ImplCandidate

    candidate = ImplCandidate("numpy", fault=os.environ.get("STANDIN_FAULT") or None)
    candidate.prepare(config, model_dir)
    return candidate


class FileTaps:
    """Writes every tensor the block reports as <outputs>/<component>/<invocation>/<name>.npy."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.calls: dict[str, int] = {}
        folder.mkdir(parents=True, exist_ok=True)

    def output(self, path, value):
        from sd_parity.runs.naming import flatten, with_call_index

        call = self.calls.get(path, 0)  # a module called again in one run is `path#1`, `path#2`, ...
        self.calls[path] = call + 1
        for name, array in flatten(with_call_index(path, call), value, lambda v: isinstance(v, np.ndarray)):
            if os.environ.get("STANDIN_MODE") == "wrong_batch":
                array = array[:1]
            np.save(self.folder / f"{name}.npy", array)

    def inputs(self, path, args):
        pass


def run_block(component, block, inputs, outputs, config_path):
    if os.environ.get("STANDIN_ONLY") and component not in os.environ["STANDIN_ONLY"].split(","):
        return 3  # "cannot run this block alone": the harness records nothing for it
    if os.environ.get("STANDIN_MODE") == "crash":
        print("standin: loading weights\nstandin: panicked at 'index out of bounds' in down_block.rs:42",
              file=sys.stderr)
        return 101
    folder = next(Path(inputs, component).iterdir())  # the one <invocation> folder
    prefix = f"{block}@"
    args = {f.stem[len(prefix):]: np.load(f) for f in folder.glob("*.npy") if f.stem.startswith(prefix)}
    if os.environ.get("STANDIN_MODE") == "empty":
        return 0
    config, model_dir = load_config(config_path)
    port(config, model_dir).run_block(component, block, args, FileTaps(Path(outputs, component, folder.name)))
    return 0


def run(config_path, output):
    from sd_parity.candidates.runner import run_free
    from sd_parity.runs.hdf5 import RunReader

    config, model_dir = load_config(config_path)
    config = type(config)(**{**config.__dict__, "model": str(model_dir)})
    with tempfile.TemporaryDirectory() as tmp:
        produced = run_free(port(config, model_dir), config, Path(tmp) / "run.h5")
        with RunReader(produced) as run_file:
            for entry in run_file.entries():
                folder = Path(output, entry.component, entry.invocation)
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / f"{entry.order:06d}__{entry.name}.npy", run_file.read(entry))
    return 0


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    sys.exit({"run-block": run_block, "run": run}[command](*arguments))
