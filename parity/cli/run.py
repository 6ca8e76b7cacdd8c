"""`parity run`: capture the reference, run impl, compare, report — for a matrix of backends, dtypes, samplers."""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from sd_parity.errors import BadInput
from sd_parity.escaping import printable
from sd_parity.candidates.registry import builtin_names
from sd_parity.cases.case import MODES, REPRO_FILE, RUNS_DIR, Case, CaseResult, phase_count
from sd_parity.cases.executors import EXECUTORS, ExecutorOptions, run_cases
from sd_parity.progress import Phases, on_terminal, table_options, use_color
from sd_parity.reports.statuses import TERMINAL_STYLES, verdict_tone
from sd_parity.runs.config import DTYPES, SCHEDULERS
from sd_parity.judging.baseline import DEFAULT_MARGIN, check_margin, compare_to_baseline, load_baseline
from sd_parity.reports.summary import SUMMARY_FILE, format_table, write_summary
from sd_parity.judging.tolerances import ToleranceConfigError, Tolerances
from .capture import add_run_arguments, config_from_args
from ._options import add_parser, add_renamed, examples
from .compare import add_baseline_arguments, add_naming_arguments, naming_options


def register(subparsers) -> None:
    parser = add_parser(
        subparsers, "run", help="check a candidate against the reference end to end: capture, run, compare, report",
        description="Capture the reference (and its fp64 oracle), run the candidate free-running and block by block "
                    "(isolated), compare and write a report per case into --output-dir. One case per sampler x "
                    "dtype x candidate. Exit 0 parity, 1 divergence, 2 bad input.",
        epilog=examples(
            ("parity run --model tiny-sd1 --candidate my_port/parity.py:make",
             "check your port (docs/ports.md) on the embedded tiny model"),
            ("parity run --model /models/sd15 --candidate my_port.parity:make --dtype fp16",
             "the same on a real SD 1.5 checkpoint (a diffusers folder) in fp16"),
            ("parity run --model tiny-sd1 --candidate numpy torch --dtype fp32 fp16 --scheduler ddim pndm",
             "a matrix of cases: our own clean-room SD on both backends"),
            ("parity run --model tiny-sd1 --candidate numpy --inject-fault groupnorm_eps",
             "see a porting bug caught and located")))
    add_run_arguments(parser)
    parser.set_defaults(scheduler=None, dtype=None)
    for action in parser._actions:  # several samplers and dtypes per run
        if action.dest in ("scheduler", "dtype"):
            action.nargs, action.default = "+", None
            action.help += f"; several make one case each (default: {'ddim' if action.dest == 'scheduler' else 'fp32'})"
    parser.add_argument("--candidate", dest="candidate", nargs="+", default=None, metavar="SPEC",
                        help="what to check against the reference: numpy, torch or both (impl/), an installed "
                             "port's name, pkg.module:factory or path/to/port.py:factory (default: both, or "
                             "only the --candidate-cmd program when one is given)")
    add_renamed(parser, "--backend", "--candidate")
    parser.add_argument("--candidate-cmd", default=None, metavar="TEMPLATE",
                        help="a port in any language, run block by block (isolated mode): e.g. \"my-port run-block "
                             "{component} {block} {inputs} {outputs}\"; inputs and outputs are run folders "
                             "(docs/run-format.md, 'A port as a command')")
    parser.add_argument("--candidate-cmd-run", default=None, metavar="TEMPLATE",
                        help="the same port's whole run (free mode): e.g. \"my-port run {config} {output}\"; it "
                             "reads the JSON run description {config} and writes its run to {output}")
    parser.add_argument("--mode", default="both", choices=MODES,
                        help="free: the candidate's own pipeline end to end; isolated: each block fed the "
                             "reference's inputs (names the culprit block); both")
    parser.add_argument("--capture", default=None, metavar="SPEC",
                        help="what to capture, as parity capture --capture (default: what the candidate reports, "
                             "else all for small models and blocks for full-size ones)")
    parser.add_argument("--live", action="store_true",
                        help="compare the free run's tensors as they are produced instead of writing them all: "
                             "metrics for every tensor, full tensors only for the first divergences, the pipeline "
                             "and the report (docs/architecture.md)")
    parser.add_argument("--no-calibrate", dest="calibrated", action="store_false",
                        help="judge by dtype tolerances only, without an fp64 oracle run (default: calibrate)")
    parser.add_argument("--config", type=Path, default=None, metavar="parity.toml",
                        help="tolerance overrides (default: ./parity.toml, else ./pyproject.toml's [tool.parity])")
    add_naming_arguments(parser, model_dir=False)
    add_fault_argument(parser)
    parser.add_argument("--output-dir", type=Path, default=Path("reports"), metavar="DIR",
                        help="folder for the reports: one subfolder per case (report.html, summary.json, "
                             "junit.xml, its run files, repro.sh) and parity.html/parity.json/junit.xml over all")
    add_baseline_arguments(parser, folder="DIR")
    parser.add_argument("--write-baseline", type=Path, default=None, metavar="DIR",
                        help="keep each case's summary.json under DIR/<case>/: the baseline of later runs "
                             "(--baseline DIR); may be the --baseline folder itself, which is then updated "
                             "(default: none)")
    add_executor_arguments(parser)
    parser.set_defaults(handler=run)


def add_executor_arguments(parser) -> None:
    group = parser.add_argument_group("where the cases run (docs/scaling.md)")
    group.add_argument("--jobs", type=_count, default=None, metavar="N",
                       help="cases at once (default: local, as many as the CPUs and the memory allow; "
                            "Ray, every case queued at once)")
    group.add_argument("--executor", default="local", choices=EXECUTORS,
                       help="local worker processes (default) or Ray tasks on a cluster (needs sd-parity[ray])")
    group.add_argument("--ray-address", default=None, metavar="ADDRESS",
                       help="the Ray cluster to use (default: a running local one, else a new local one)")
    group.add_argument("--shared-dir", type=Path, default=None, metavar="DIR",
                       help="a folder every worker sees: the run cache (reference, oracle and candidate runs, "
                            "made once for all cases) and the generated models go there")


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count; give a whole number >= 1")
    return int(text)


def executor_options(args) -> ExecutorOptions:
    if args.ray_address and args.executor != "ray":
        raise BadInput("--ray-address is for --executor ray")
    return ExecutorOptions(executor=args.executor, jobs=args.jobs, threads=getattr(args, "threads", None),
                           ray_address=args.ray_address, shared_dir=args.shared_dir)


def add_fault_argument(parser) -> None:
    from sd_parity.candidates.faults import FAULTS

    parser.add_argument("--inject-fault", default=None, choices=sorted(FAULTS), metavar="FAULT",
                        help="inject a known porting bug into impl/ (numpy, torch) to see the harness catch it: "
                             + ", ".join(sorted(FAULTS)) + " (default: none)")


def with_fault(cases: list[Case], name: str | None) -> list[Case]:
    return cases if name is None else [replace(case, fault=name) for case in cases]


def command_candidate(args) -> dict[str, str]:
    """{spec: mode} for the --candidate-cmd program: each mode it has a command for, as --mode asks."""
    from sd_parity.candidates.subprocess import CommandCandidate

    candidate = CommandCandidate(args.candidate_cmd, args.candidate_cmd_run)
    available = [m for m, ok in (("free", candidate.supports_free()), ("isolated", candidate.supports_blocks())) if ok]
    wanted = ["free", "isolated"] if args.mode == "both" else [args.mode]
    modes = [m for m in wanted if m in available]
    if not modes:
        option = "--candidate-cmd-run" if args.mode == "free" else "--candidate-cmd"
        raise BadInput(f"--mode {args.mode} needs {option} for the port's command")
    return {candidate.spec(): "both" if len(modes) == 2 else modes[0]}


def run(args) -> int:
    schedulers, dtypes = args.scheduler or ["ddim"], args.dtype or ["fp32"]
    for value, allowed, option in ((schedulers, SCHEDULERS, "--scheduler"), (dtypes, DTYPES, "--dtype")):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise BadInput(f"{option} {' '.join(unknown)}: unknown; use {', '.join(allowed)}")
    args.scheduler, args.dtype = schedulers[0], dtypes[0]
    base = config_from_args(args)
    naming_options(args)  # a bad map or scope is bad input before any work is done
    specs = args.candidate or ([] if args.candidate_cmd or args.candidate_cmd_run else ["both"])
    modes = {c: args.mode for spec in specs for c in (builtin_names() if spec == "both" else (spec,))}
    if args.candidate_cmd or args.candidate_cmd_run:
        modes.update(command_candidate(args))
    naming = dict(maps=tuple(args.map), only=tuple(args.only), require=args.require)
    cases = with_fault([Case(replace(base, scheduler=s, dtype=d), c, mode, args.calibrated, live=args.live, **naming)
                        for s, d, (c, mode) in itertools.product(schedulers, dtypes, modes.items())], args.inject_fault)
    baselines = Baselines(args.baseline, args.write_baseline, check_margin(args.baseline_margin))
    return execute(cases, args.output_dir, args.config, title=f"parity run on {base.model}",
                   options=executor_options(args), baselines=baselines)


@dataclass(frozen=True)
class Baselines:
    """--baseline DIR (each case judged against DIR/<case>/summary.json), --write-baseline DIR."""

    read: Path | None = None
    write: Path | None = None
    margin: float = DEFAULT_MARGIN

    def check(self, cases: list[Case]) -> None:
        if self.read is not None and not any((self.read / c.name / SUMMARY_FILE).is_file() for c in cases):
            raise BadInput(f"--baseline {self.read}: no case's summary.json there (expected {self.read}/<case>/"
                           f"{SUMMARY_FILE}, as --write-baseline or --output-dir of an earlier parity run leaves)")

    def judge(self, result: CaseResult) -> None:
        """Attach the baseline section to a finished case (its summary.json rewritten with it)."""
        if self.read is None:
            return
        file = self.read / result.case.name / SUMMARY_FILE
        # a case the baseline does not have: all its tensors are new
        baseline = load_baseline(file) if file.is_file() else {"tensors": [], "path": None}
        result.summary["baseline"] = compare_to_baseline(result.summary, baseline, self.margin)
        write_summary(result.summary, result.out_dir)

    def keep(self, results: list[CaseResult]) -> None:
        for result in results if self.write is not None else []:
            (self.write / result.case.name).mkdir(parents=True, exist_ok=True)
            write_summary(result.summary, self.write / result.case.name)


def execute(cases: list[Case], output_dir: Path, config: Path | None, title: str,
            options: ExecutorOptions = ExecutorOptions(), baselines: Baselines = Baselines()) -> int:
    from sd_parity.reports.index import index_dict, write_index_set

    try:
        tolerances = Tolerances.load(config) if config else Tolerances.discover(Path.cwd())
    except ToleranceConfigError as exc:
        raise BadInput(str(exc)) from exc
    baselines.check(cases)
    names = [case.name for case in cases]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # one report folder per name: a second case would overwrite the first's reports
        raise BadInput(f"two cases are named {', '.join(twice)}; give each case its own name (a label)")
    output_dir.mkdir(parents=True, exist_ok=True)
    # on a terminal, one bar over every case's phases (Ray's workers print their own lines)
    phases = Phases(sum(phase_count(case) for case in cases), len(cases),
                    enabled=on_terminal(sys.stderr) and options.executor == "local")
    color = use_color(sys.stdout)

    def finished(position: int, result: CaseResult) -> None:
        baselines.judge(result)
        phases.done(position + 1, phase_count(result.case), _case_line(result, color))

    try:
        results = run_cases(cases, output_dir, tolerances, options, finished, phases)
    finally:
        phases.close()
    baselines.keep(results)
    failed = [r for r in results if not r.passed]
    for result in failed:
        print(f"\n== {printable(result.case.name)} ==\n{format_table(result.summary, **table_options(sys.stdout))}")
    index = index_dict(results, title)
    paths = write_index_set(index, results, output_dir)
    outcome = "without regression since the baseline" if baselines.read is not None else "at parity"
    print(f"\n{len(results) - len(failed)}/{len(results)} cases {outcome}. Reports:")
    for path in paths:
        print(f"  {path.resolve().as_uri() if path.suffix == '.html' else path}")
    if len(results) == 1:
        print(f"  case folder {results[0].out_dir} (run files in {RUNS_DIR}/, rerun with {REPRO_FILE})")
    return 0 if not failed else 1


def _case_line(result: CaseResult, color: bool) -> str:
    """One line per finished case: ok/FAIL, its name, its verdict and how long it took."""
    mark = "ok  " if result.passed else "FAIL"
    if color:
        from rich.console import Console
        from rich.text import Text

        console = Console(force_terminal=True, highlight=False, width=100_000)
        with console.capture() as captured:
            console.print(Text(mark, style=TERMINAL_STYLES[verdict_tone(result.summary["verdict"])]), end="")
        mark = captured.get()
    found = f"; {result.summary['baseline']['text']}" if "baseline" in result.summary else ""
    text = printable(f"{result.case.name:40s} {result.summary['verdict']['text']}{found}  ({result.seconds:.1f} s)")
    return f"{mark} {text}"
