"""Conversion benchmark: `qwen35_mlx.convert` against `mlx_lm.convert` on the same checkpoint.

Every conversion runs in a fresh Python process (`python -m benchmarks.convert --job JOB`), so
its peak resident set (`ru_maxrss` of that process) and MLX peak (`mx.get_peak_memory`) belong
to it alone; `RUSAGE_CHILDREN` in the parent would only give the largest child so far. The child
reports the time of the convert call itself, after its imports. Ours runs with
`verify_output=False`, since mlx-lm does not verify either. Once every conversion is done, each
output is loaded here and its logits on the first EVAL_TOKENS tokens of `convert.verify.PROMPT`
are compared with the float source's as qwen35_mlx computes them (relative error and KL,
`compare_logits`); mlx-lm's own model run on the unconverted source gives the share of its
errors that is implementation, not conversion. The logits are computed in float32 from the
stored weights, so they measure what conversion lost rather than bfloat16 activation rounding;
it is also ~10x quicker on the CPU backend, whose bfloat16 quantized matmul is slow.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx

from qwen35_mlx.bench.report import print_rows, progress

OURS, MLX_LM = "qwen35_mlx", "mlx-lm"
FLOAT_DTYPE = "bfloat16"
VISION_PREFIXES = ("vision_tower.", "model.visual.")
EVAL_TOKENS = 32
REPOSITORY = Path(__file__).resolve().parents[1]  # children import benchmarks from here


@dataclass(frozen=True)
class Job:
    tool: str  # OURS or MLX_LM
    recipe: str  # "hybrid"/"uniform" (ours), "default" (mlx-lm), "-" (float)
    bits: int | None  # None: float, FLOAT_DTYPE

    @property
    def name(self) -> str:
        return f"{self.tool}-{self.recipe if self.bits else 'float'}-{self.bits or FLOAT_DTYPE}"


@dataclass
class Outcome:
    """What one conversion produced and cost; errors filled in after all conversions."""

    job: Job
    path: Path
    returncode: int
    seconds: float = float("nan")  # the convert call, in the child
    rss_gb: float = float("nan")  # peak resident set of the child process
    import_rss_gb: float = float("nan")  # ... reached by its imports, before converting
    mlx_peak_gb: float = float("nan")
    size_gb: float = float("nan")  # every file in the output folder
    text_gb: float = float("nan")  # tensor bytes of the text decoder (no vision, no MTP)
    vision: bool = False
    mtp: bool = False
    quantized: int = 0  # matrices stored quantized (tensors with .scales)
    relative_error: float = float("nan")
    kl: float = float("nan")


def jobs(bits: list[int]) -> list[Job]:
    """Float conversions first, then per bit width: ours hybrid, ours uniform, mlx-lm."""
    out = [Job(OURS, "-", None), Job(MLX_LM, "-", None)]
    for b in sorted(set(bits)):
        out += [Job(OURS, "hybrid", b), Job(OURS, "uniform", b), Job(MLX_LM, "default", b)]
    return out


def bench_convert(
    hf_path: str, bits: list[int], group_size: int = 64, out_dir: str | None = None
) -> tuple[list[Outcome], tuple[float, float]]:
    """Run every conversion of `jobs(bits)` on `hf_path`, then measure each output's logits.

    Args:
        hf_path: local Hugging Face checkpoint directory (bfloat16 or float32).
        bits: bit widths to quantize at (each by ours hybrid, ours uniform, mlx-lm).
        group_size: quantization group size, for both tools.
        out_dir: where the outputs go (new or empty folder; they are kept). Default: a
            temporary folder, deleted at the end.

    Returns:
        (one Outcome per conversion in `jobs` order, (relative error, KL) of mlx-lm's model
        on the unconverted source).
    """
    source = Path(hf_path)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(
            f"{source / 'config.json'} not found; --hf-path must be a local "
            "checkpoint folder (write one with `qwen35-mlx bench "
            "make-checkpoint`)"
        )
    keep = out_dir is not None
    if keep:
        root = Path(out_dir)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ValueError(
                f"{root} exists and is not an empty folder; choose a new --out-dir "
                "or delete it first"
            )
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="qwen35-convert-bench-"))
    try:
        outcomes = [
            convert_in_child(job, source, root / job.name, group_size) for job in jobs(bits)
        ]
        for outcome in outcomes:
            if outcome.returncode == 0:
                outcome.__dict__.update(inspect_output(outcome.path))
        baseline = logit_errors(source, [o for o in outcomes if o.returncode == 0])
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return outcomes, baseline


def convert_in_child(job: Job, source: Path, target: Path, group_size: int) -> Outcome:
    progress(f"{job.name}: converting")
    spec = {
        "job": asdict(job),
        "hf_path": str(source),
        "mlx_path": str(target),
        "group_size": group_size,
    }
    # the child's own chatter goes to stderr; its stdout carries only the result line
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.convert", "--job", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
        cwd=REPOSITORY,
    )
    outcome = Outcome(job, target, child.returncode)
    if child.returncode != 0:
        progress(f"{job.name}: FAILED with exit status {child.returncode} (see above)")
        return outcome
    outcome.__dict__.update(json.loads(child.stdout.strip().splitlines()[-1]))
    progress(
        f"{job.name}: {outcome.seconds:.1f} s, peak RSS {outcome.rss_gb:.2f} GB, MLX peak "
        f"{outcome.mlx_peak_gb:.2f} GB"
    )
    return outcome


def run_conversion(job: Job, hf_path: str, mlx_path: str, group_size: int) -> dict:
    """In the child: one conversion, timed after the imports."""
    quantize = job.bits is not None
    if job.tool == OURS:
        from qwen35_mlx.convert import convert

        kwargs = dict(
            quantize=quantize,
            q_bits=job.bits or 4,
            q_group_size=group_size,
            recipe=job.recipe if quantize else "hybrid",
            verify_output=False,
        )
    else:
        from mlx_lm.convert import convert

        kwargs = dict(
            quantize=quantize, q_bits=job.bits, q_group_size=group_size if quantize else None
        )
    import_rss_gb = max_rss_gb()
    mx.reset_peak_memory()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        convert(hf_path, mlx_path, dtype=FLOAT_DTYPE, **kwargs)
    return {
        "seconds": time.perf_counter() - start,
        "rss_gb": max_rss_gb(),
        "import_rss_gb": import_rss_gb,
        "mlx_peak_gb": mx.get_peak_memory() / 1e9,
    }


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB


def inspect_output(directory: Path) -> dict:
    """Size on disk and what the output kept, read from its safetensors headers."""
    tensors: dict[str, int] = {}
    for file in directory.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        tensors.update(
            {
                name: end - begin
                for name, spec in header.items()
                for begin, end in [spec["data_offsets"]]
            }
        )

    def other(name: str) -> bool:
        return name.startswith(VISION_PREFIXES) or name.startswith("mtp.")

    return {
        "size_gb": sum(f.stat().st_size for f in directory.iterdir() if f.is_file()) / 1e9,
        "text_gb": sum(n for name, n in tensors.items() if not other(name)) / 1e9,
        "vision": any(name.startswith(VISION_PREFIXES) for name in tensors),
        "mtp": any(name.startswith("mtp.") for name in tensors),
        "quantized": sum(name.endswith(".scales") for name in tensors),
    }


def logit_errors(source: Path, outcomes: list[Outcome]) -> tuple[float, float]:
    """Fills in each outcome's logit error against the float source on one short prompt;
    returns that of mlx-lm's model on the source itself."""
    from mlx_lm.utils import load_model as mlx_lm_load_model

    from qwen35_mlx.convert.verify import PROMPT, compare_logits
    from qwen35_mlx.loading import load_model
    from qwen35_mlx.tokenizer import Tokenizer

    progress("logits: source")
    ids = mx.array([Tokenizer.from_pretrained(source).encode(PROMPT)[:EVAL_TOKENS]])
    reference = load_model(source, dtype="float32")(ids)
    mx.eval(reference)

    def error(tool: str, path: Path) -> tuple[float, float]:
        if tool == OURS:
            model = load_model(path, dtype="float32")
        else:
            model = mlx_lm_load_model(path)[0]
            model.set_dtype(mx.float32)  # quantized weights stay as stored; scales follow
        result = compare_logits(reference, model(ids))
        del model
        gc.collect()
        mx.clear_cache()
        return result

    progress("logits: mlx-lm on the source")
    baseline = error(MLX_LM, source)
    for outcome in outcomes:
        progress(f"logits: {outcome.job.name}")
        outcome.relative_error, outcome.kl = error(outcome.job.tool, outcome.path)
    return baseline


def print_table(
    outcomes: list[Outcome], baseline: tuple[float, float], source: str, group_size: int
) -> None:
    print(
        f"source {source}; group size {group_size}; float = {FLOAT_DTYPE}; one process per "
        f"conversion; MLX {mx.__version__} on {mx.default_device()}"
    )
    columns = (
        "tool",
        "recipe",
        "bits",
        "size GB",
        "text GB",
        "vision",
        "mtp",
        "quantized",
        "time s",
        "peak RSS GB",
        "MLX peak GB",
        "logit rel err",
        "KL nats/tok",
    )
    rows = [row(o) for o in outcomes]
    for bits in sorted({o.job.bits for o in outcomes}, key=lambda b: b or 0):
        theirs = next(
            (o for o in outcomes if o.job == Job(MLX_LM, "default" if bits else "-", bits)), None
        )
        for ours in (o for o in outcomes if o.job.tool == OURS and o.job.bits == bits):
            label = f"ours {ours.job.recipe if bits else 'float'}/mlx-lm"
            rows.append(ratio_row(label, bits, ours, theirs))
    print_rows(columns, rows, text_columns=3)
    print(
        "(size GB: all files of the output; text GB: tensor bytes without vision tower and MTP "
        "head; quantized: matrices stored quantized; time: the convert call in its own "
        "process, imports excluded; peak RSS includes the imports: "
        + ", ".join(
            f"{tool} {min(o.import_rss_gb for o in outcomes if o.job.tool == tool):.2f} GB"
            for tool in (OURS, MLX_LM)
            if any(o.job.tool == tool and o.returncode == 0 for o in outcomes)
        )
        + f"; errors: float32 logits on {EVAL_TOKENS} prompt tokens vs the source's as "
        "qwen35_mlx computes them)"
    )
    print(
        f"mlx-lm's model on the unconverted source: logit rel err {baseline[0]:.3e}, KL "
        f"{baseline[1]:.3e} nats/tok (implementation difference, not conversion)"
    )
    if any(o.vision or o.mtp for o in outcomes if o.job.tool == OURS and not o.returncode):
        print(
            "(ours keeps the vision tower and MTP head, mlx-lm drops them, so the ratios compare "
            "different outputs; for like-for-like memory ratios convert a checkpoint written "
            "by `qwen35-mlx bench make-checkpoint --no-vision --no-mtp`)"
        )


def row(o: Outcome) -> list[str]:
    bits = str(o.job.bits) if o.job.bits else FLOAT_DTYPE
    if o.returncode != 0:
        return [o.job.tool, o.job.recipe, bits, f"FAILED (exit status {o.returncode})"] + [""] * 9
    yes = {True: "yes", False: "no"}
    return [
        o.job.tool,
        o.job.recipe,
        bits,
        f"{o.size_gb:.3f}",
        f"{o.text_gb:.3f}",
        yes[o.vision],
        yes[o.mtp],
        str(o.quantized),
        f"{o.seconds:.2f}",
        f"{o.rss_gb:.2f}",
        f"{o.mlx_peak_gb:.2f}",
        f"{o.relative_error:.3e}",
        f"{o.kl:.3e}",
    ]


def ratio_row(label: str, bits: int | None, ours: Outcome, theirs: Outcome | None) -> list[str]:
    fields = ("size_gb", "text_gb", None, None, None, "seconds", "rss_gb", "mlx_peak_gb")

    def ratio(field: str | None) -> str:
        if field is None or theirs is None or ours.returncode or theirs.returncode:
            return ""
        a, b = getattr(ours, field), getattr(theirs, field)
        return f"{a / b:.2f}x" if b else "-"

    return [label, "", str(bits) if bits else FLOAT_DTYPE] + [ratio(f) for f in fields] + ["", ""]


def failed(outcomes: list[Outcome]) -> int:
    return 1 if any(o.returncode for o in outcomes) else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.convert",
        description="Converts one checkpoint with qwen35_mlx.convert (hybrid and uniform "
        "recipes) and mlx_lm.convert at each bit width, plus a bfloat16 float "
        "conversion by each, every conversion in its own process; then compares "
        "each output's logits with the source's.",
    )
    parser.add_argument("--hf-path", help="local Hugging Face checkpoint folder")
    parser.add_argument(
        "--bits",
        type=int,
        nargs="+",
        choices=(4, 6, 8),
        default=[4, 6, 8],
        help="bit widths to quantize at",
    )
    parser.add_argument(
        "--group-size", type=int, choices=(32, 64, 128), default=64, help="quantization group size"
    )
    parser.add_argument(
        "--out-dir",
        help="keep the outputs in this new folder (default: a "
        "temporary folder, deleted at the end)",
    )
    parser.add_argument("--job", help=argparse.SUPPRESS)  # one conversion, in a child process
    args = parser.parse_args(argv)
    if args.job is None and args.hf_path is None:
        parser.error("--hf-path is required")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.job is not None:  # a child of `convert_in_child`
        spec = json.loads(args.job)
        result = run_conversion(
            Job(**spec["job"]), spec["hf_path"], spec["mlx_path"], spec["group_size"]
        )
        print(json.dumps(result), flush=True)
        return 0
    outcomes, baseline = bench_convert(args.hf_path, args.bits, args.group_size, args.out_dir)
    print_table(outcomes, baseline, args.hf_path, args.group_size)
    return failed(outcomes)


if __name__ == "__main__":
    sys.exit(main())
