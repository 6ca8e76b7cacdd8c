"""One txt2img run, bare: no hooks, no capture, nothing written; loading included, as in `parity run`.

    python -m tests.benchmarks.bare_txt2img MODEL diffusers|torch|numpy STEPS SIZE
prints one JSON line: the seconds from before loading the model to the decoded image, and the threads.
The run is the one `parity run` makes for these settings (its x_T, prompt, sampler and guidance).
"""
import json
import sys
import time


def main() -> None:
    from sd_parity import threads

    count = threads.apply()
    model, impl, steps, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    from sd_parity.runs.config import RunConfig

    config = RunConfig(model=model, steps=steps, height=size, width=size)
    started = time.perf_counter()
    if impl == "diffusers":
        import torch

        from sd_parity.reference.runner import _call_arguments, load_pipeline, scheduler_for

        threads.pin_torch()
        pipe = load_pipeline(config.model_dir(), config.dtype)
        pipe.scheduler = scheduler_for(config.scheduler, pipe.scheduler.config, config.karras)
        pipe.set_progress_bar_config(disable=True)
        x_t = torch.from_numpy(config.initial_noise(latent_channels=pipe.vae.config.latent_channels,
                                                    scale=pipe.vae_scale_factor))
        with torch.inference_mode():
            pipe(**_call_arguments(config, x_t), generator=torch.Generator().manual_seed(config.seed))
    else:
        from sd_parity.candidates.impl import ImplCandidate, request_for
        from sd_parity.candidates.replay import SeededReplay

        candidate = ImplCandidate(impl)
        candidate.prepare(config, config.model_dir())
        replay = SeededReplay(config, scale=candidate.sd.vae_scale)
        candidate.sd(request_for(config, replay.x_T, replay.noise))
    print(json.dumps({"seconds": time.perf_counter() - started, "threads": count}))


if __name__ == "__main__":
    main()
