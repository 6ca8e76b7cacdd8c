"""One impl txt2img on a model, in a fresh process, with the tool's default thread policy (parity/threads.py).

    python -m tests.benchmarks.txt2img_call MODEL BACKEND [STEPS] [SIZE]
prints one JSON line: seconds of the denoising loop and decode (model loading excluded, after one
warm-up run), and the thread count used.
"""
import json
import sys
import time


def main() -> None:
    from sd_parity import threads

    count = threads.apply()
    from sd_parity.candidates.impl import ImplCandidate, request_for
    from sd_parity.candidates.replay import SeededReplay
    from sd_parity.runs.config import RunConfig

    model, backend = sys.argv[1], sys.argv[2]
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    size = int(sys.argv[4]) if len(sys.argv) > 4 else None
    config = RunConfig(model=model, steps=steps, height=size, width=size)
    candidate = ImplCandidate(backend)
    candidate.prepare(config, config.model_dir())
    replay = SeededReplay(config, scale=candidate.sd.vae_scale)
    timings = []
    for _ in range(2):  # the first run pays for first-call allocations and kernel selection
        started = time.perf_counter()
        candidate.sd(request_for(config, replay.x_T, replay.noise))
        timings.append(time.perf_counter() - started)
    print(json.dumps({"seconds": timings[-1], "threads": count}))


if __name__ == "__main__":
    main()
