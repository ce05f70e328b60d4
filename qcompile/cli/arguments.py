"""The command line's flags: the argparse definitions of ``qcompile MODEL.py``, ``qcompile train`` and ``qcompile
sweep``, the checks of flags that argparse cannot make, and the wording of the library's domain errors in flags."""

from __future__ import annotations

import argparse
import math
import os

from qcompile.errors import QCompileError
from qcompile.passes.adaquant import SCOPES
from qcompile.quantization.ptq import PTQ_MODES
from qcompile.quantization.recipes import RECIPES
from qcompile.search.sensitivity import METRICS

FLAGS = {name: "--" + name.replace("_", "-") for name in (
    "adaquant_scope", "backend", "batch_size", "bits", "budget", "cost_model", "data", "dyadic", "lr", "max_degradation",
    "model_arg", "normalize", "out", "ptq", "recipe", "target", "weights_key")}
"""The flag that gives each library parameter a user error names (an ``InvalidValueError``'s ``field``, the
``{parameter}`` fields of a message built with :meth:`QCompileError.with_parameters`)."""

_DEFAULT_BITS, _DEFAULT_METRIC, _DEFAULT_ADAQUANT_ITERS = "4,8", "kl", 200


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``qcompile MODEL.py``."""
    ap = argparse.ArgumentParser(
        prog="qcompile",
        description="Quantize a PyTorch CNN: capture it with torch.fx, run a recipe's passes, report its costs.",
    )
    ap.add_argument("model", help="model file defining build_model(**kwargs) and example_input()")
    ap.add_argument("--recipe", default="mostly4bit", help=f"one of: {', '.join(RECIPES)} (default: mostly4bit)")
    ap.add_argument("--width", type=float, default=1.0, help="global filter multiplier c (re-initialises weights)")
    ap.add_argument("--weights", help="state dict to load (torch.load with weights_only=True)")
    ap.add_argument("--weights-key", metavar="KEY",
                    help="--weights: take checkpoint[KEY], e.g. model_ema (default: the state dict itself, or "
                         "the one under state_dict, model, model_state_dict or net)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="PATTERN=BITS",
                    help="per-layer override, e.g. 'layer1.*=8', 'fc=w8a8', 'conv1=bf16' (repeatable)")
    ap.add_argument("--overrides", help="TOML or JSON file of PATTERN = BITS overrides")
    ap.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE",
                    help="keyword passed to build_model, e.g. stem=cifar (repeatable)")
    ap.add_argument("--leaf-module", dest="leaf_modules", action="append", default=[], metavar="NAME",
                    help="module path or class name to keep opaque when tracing (repeatable)")
    ap.add_argument("--dump-after", dest="dump_after", action="append", default=[], metavar="PASS",
                    help="print the graph after this pass ('all' for every pass; repeatable)")
    ap.add_argument("--data", help="CIFAR-style archive (.tar.gz) or ImageFolder directory with train/ and test/ "
                                   "splits; overrides the model file's calibration_data()/eval_data()")
    _normalize_flag(ap)
    ap.add_argument("--calib-size", type=int, default=512, metavar="N", help="calibration images (default 512)")
    ap.add_argument("--calib-seed", type=int, default=0, metavar="S",
                    help="which --calib-size training images calibrate (a seeded draw; default 0), from --data "
                         "or a calibration_data() returning qcompile.data.Batches")
    ap.add_argument("--eval-size", type=int, default=None, metavar="N", help="evaluation images (default: all)")
    ap.add_argument("--calibrator", help="activation calibrator for every layer: ema_max, max, percentile, mse "
                                         "(default: the recipe's)")
    ap.add_argument("--batch-size", type=int, default=256, help="batch size for --data (default 256)")
    ap.add_argument("--verify-size", type=int, default=2000, metavar="N",
                    help="images on which the integer reference is checked against the fake-quant model "
                         "(default 2000; 0 skips verification)")
    ap.add_argument("--backend", dest="backends", action="append", choices=["onnx", "tvm", "none"], default=None,
                    help="artifacts to build from the integer IR (default: onnx, when the onnx extra is installed); "
                         "onnx writes model.onnx (serving) and model.compact.onnx; tvm writes tvm/<target>/")
    ap.add_argument("--onnx-weight-type", choices=["auto", "int8", "uint8"], default="auto",
                    help="container of the 8-bit weights past +-64 in the ONNX models: int8 runs onnxruntime's fastest "
                         "kernels, exact on CPUs with VNNI or AMX but saturating on x86-64 without (AVX2); uint8 is "
                         "exact everywhere, slower; auto (default) takes int8 where this CPU is exact, else uint8")
    ap.add_argument("--target", dest="targets", action="append", choices=["cpu", "sm80", "sm90", "cpu-generic"],
                    default=None, help="TVM target (repeatable): cpu = x86-64 with AVX-512 VNNI, sm80 = A100, "
                                       "sm90 = H100, cpu-generic = x86-64 AVX2 (default: cpu where this machine "
                                       "has AVX-512 VNNI, else cpu-generic, so that it is verified here)")
    ap.add_argument("--tvm-batch", type=int, metavar="N",
                    help="compile the TVM artifacts for batches of N images (default: any batch size; the loader "
                         "splits and pads). On an H100, ResNet-50 sm90 at batch 256 ran 2.5x faster built for 256")
    ap.add_argument("--dyadic", action="store_true",
                    help="integer-only requantization (int32 multiplier and shift) instead of float32 multipliers")
    ap.add_argument("--ptq", choices=PTQ_MODES, help="post-training pipeline (Hubara et al.): light = BN tuning "
                                                     "(+ mixed precision with --recipe auto); advanced = AdaQuant + "
                                                     "BN tuning + bias correction (+ mixed precision)")
    ap.add_argument("--budget", metavar="KIND=RATIO", help="--recipe auto: cost budget vs bf16, KIND linear, "
                                                           "quadratic or memory, e.g. linear=0.30")
    ap.add_argument("--max-degradation", type=float, metavar="LOSS",
                    help="--recipe auto: cheapest plan whose predicted degradation (in --sensitivity units) is at "
                         "most LOSS")
    ap.add_argument("--bits", default=_DEFAULT_BITS, metavar="B,B",
                    help="--recipe auto: candidate widths (default 4,8; 2-8)")
    ap.add_argument("--sensitivity", choices=METRICS, default=_DEFAULT_METRIC,
                    help="--recipe auto: per-layer degradation measure, kl = KL divergence from the all-widest "
                         "network's outputs (default), loss = calibration cross-entropy change")
    ap.add_argument("--adaquant-iters", type=int, default=_DEFAULT_ADAQUANT_ITERS, metavar="N",
                    help="AdaQuant Adam steps per layer or block (default 200)")
    ap.add_argument("--adaquant-scope", choices=SCOPES, default="layer",
                    help="--ptq advanced: match each layer's output to the float network (layer, Hubara et al.) "
                         "or each block's (block: the stem, every residual block, the head; BRECQ)")
    ap.add_argument("--cost-model", metavar="measured:PROFILE",
                    help="also cost every layer by a latency profile written by qcompile profile: a measured "
                         "column in the report and --budget latency=R for --recipe auto")
    ap.add_argument("--measure", type=int, default=31, metavar="ROUNDS",
                    help="time the ONNX serving artifact and the float model in onnxruntime on this machine, in "
                         "ROUNDS interleaved rounds (medians), and profile it per layer (default 31; 0 skips)")
    ap.add_argument("--measure-batch", default="1", metavar="B,B",
                    help="--measure: batch sizes to time (default 1)")
    ap.add_argument("--measure-threads", type=int, default=os.cpu_count() or 1, metavar="N",
                    help=f"--measure: onnxruntime intra-op threads (default: the logical cores, {os.cpu_count()})")
    ap.add_argument("--out", help="output directory (default: qcompile-out/<model>-<recipe>)")
    ap.add_argument("--quiet", action="store_true", help="do not print the per-layer table")
    return ap


def check_compile_args(args: argparse.Namespace) -> None:
    """Refuse, before any work, flags that contradict each other or are out of range."""
    if args.dyadic and "onnx" in (args.backends or []):
        raise QCompileError("--backend onnx cannot carry --dyadic requantization (ONNX QDQ has no such form)")
    if not math.isfinite(args.width) or args.width <= 0:
        raise QCompileError(f"--width must be a positive number, got {args.width}")
    if "tvm" not in (args.backends or []) and (args.targets or args.tvm_batch is not None):
        raise QCompileError("--target and --tvm-batch apply to --backend tvm")
    if args.tvm_batch is not None and args.tvm_batch < 1:
        raise QCompileError("--tvm-batch must be at least 1")
    if args.weights and args.width != 1.0:
        raise QCompileError(
            "--weights cannot be combined with --width other than 1: width_scale re-initialises every layer; "
            "pass the trained width to build_model instead (--model-arg width=C)"
        )
    if args.weights_key is not None and not args.weights:
        raise QCompileError("--weights-key applies to --weights")
    if min(args.calib_size, args.eval_size or 0, args.verify_size, args.calib_seed, args.adaquant_iters) < 0:
        raise QCompileError("--calib-size, --eval-size, --verify-size, --calib-seed and --adaquant-iters must not be "
                            "negative")
    if args.batch_size < 1:
        raise QCompileError("--batch-size must be at least 1")
    searched = args.recipe == "auto"
    for flag, value, default in (("--bits", args.bits, _DEFAULT_BITS), ("--sensitivity", args.sensitivity,
                                                                       _DEFAULT_METRIC)):
        if value != default and not searched:
            raise QCompileError(f"{flag} sets how --recipe auto chooses widths; add --recipe auto")
    if args.adaquant_iters != _DEFAULT_ADAQUANT_ITERS and args.ptq != "advanced":
        raise QCompileError("--adaquant-iters sets how --ptq advanced runs AdaQuant; add --ptq advanced")
    if args.normalize is not None and not args.data:
        raise QCompileError("--normalize applies to --data")
    if args.measure < 0 or args.measure_threads < 1:
        raise QCompileError("--measure must not be negative and --measure-threads must be at least 1")
    args.measure_batches = parse_sizes(args.measure_batch, "--measure-batch")
    if args.cost_model is not None and not args.cost_model.startswith("measured:"):
        raise QCompileError(f"--cost-model {args.cost_model!r}: expected measured:PROFILE, a file written by "
                            "qcompile profile (linear, quadratic and memory are always reported)")
    if args.budget and args.budget.strip().lower().startswith("latency") and args.cost_model is None:
        raise QCompileError("--budget latency=R needs a latency profile: --cost-model measured:PROFILE "
                            "(write one with qcompile profile MODEL.py)")


def parse_sizes(text: str, flag: str) -> list[int]:
    """``1,8`` → [1, 8]: positive batch sizes."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise QCompileError(f"{flag} {text!r}: expected positive batch sizes separated by commas, e.g. 1,8")
    return sizes


def _normalize_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--normalize", metavar="cifar|imagenet|MEAN,STD",
                    help="--data: input normalisation, cifar, imagenet, or six numbers: three RGB means, then "
                         "three standard deviations, e.g. 0.5,0.5,0.5,0.25,0.25,0.25 (default: cifar for 32x32 "
                         "images, imagenet otherwise)")


def _train_common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("model", help="model file defining build_model(**kwargs) and example_input()")
    ap.add_argument("--data", required=True, help="CIFAR-style archive (.tar.gz) or ImageFolder directory with "
                                                  "train/ and test/ splits")
    _normalize_flag(ap)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=256, help="global batch size (default 256)")
    ap.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the cosine schedule (default 0.1)")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--observe-fraction", type=float, default=0.2, metavar="F",
                    help="fraction of steps during which activation bounds are observed (EMA of max|x|) before "
                         "they are frozen and quantization switches on (default 0.2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--train-size", type=int, default=None, metavar="N", help="training images (default: all)")
    ap.add_argument("--eval-size", type=int, default=None, metavar="N", help="evaluation images (default: all)")
    ap.add_argument("--train-eval-size", type=int, default=10_000, metavar="N",
                    help="training images on which the train loss is measured (default 10000)")
    ap.add_argument("--verify-size", type=int, default=200, metavar="N",
                    help="images on which the integer reference is run against the lowered model (default 200)")
    ap.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--leaf-module", dest="leaf_modules", action="append", default=[], metavar="NAME")
    ap.add_argument("--compile", action="store_true", help="torch.compile the training step (GPU)")
    ap.add_argument("--out", help="output directory")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")


def build_train_parser(command: str) -> argparse.ArgumentParser:
    """The parser of ``qcompile train`` or, for any other ``command``, ``qcompile sweep``."""
    if command == "train":
        ap = argparse.ArgumentParser(prog="qcompile train", description="Quantization-aware training of one model; "
                                     "the result is lowered to the integer IR and evaluated.")
        _train_common(ap)
        ap.add_argument("--recipe", default="mostly4bit", help=f"one of: {', '.join(RECIPES)} (default: mostly4bit)")
        ap.add_argument("--width", type=float, default=None,
                        help="global filter multiplier (re-initialises the weights; default: the model as built)")
        ap.add_argument("--weights", help="state dict to start from (fine-tuning)")
        ap.add_argument("--set", dest="sets", action="append", default=[], metavar="PATTERN=BITS")
        return ap
    ap = argparse.ArgumentParser(prog="qcompile sweep", description="Train every (width, recipe) pair from scratch "
                                 "and plot accuracy against cost; resumable.")
    _train_common(ap)
    ap.add_argument("--widths", default="0.5,0.75,1.0,1.5,2.0", help="comma-separated width multipliers")
    ap.add_argument("--cost-model", metavar="measured:PROFILE",
                    help="also plot top-1 against the latency a profile from qcompile profile predicts")
    ap.add_argument("--recipes", default="bf16,int8,mostly4bit,int4", help="comma-separated recipes")
    return ap


def build_profile_parser() -> argparse.ArgumentParser:
    """The parser of ``qcompile profile``."""
    ap = argparse.ArgumentParser(
        prog="qcompile profile",
        description="Measure a latency profile: every distinct layer shape of a model at each candidate precision "
                    "and in float, in the deployed runtime on this machine. --cost-model measured:PROFILE uses it.")
    ap.add_argument("model", nargs="?", help="model file defining build_model(**kwargs) and example_input()")
    ap.add_argument("--backend", choices=["onnx", "tvm"], default="onnx",
                    help="runtime to measure: onnx = onnxruntime's CPU kernels (default); tvm = TVM artifacts")
    ap.add_argument("--target", choices=["cpu", "cpu-generic", "sm80", "sm90"],
                    help="--backend tvm: the target to build for (default: cpu where this machine has AVX-512 VNNI, "
                         "else cpu-generic); one this machine cannot run (sm80, sm90) needs --stage")
    ap.add_argument("--stage", metavar="DIR",
                    help="--backend tvm: build every model into DIR and stop, to measure them where they run")
    ap.add_argument("--staged", metavar="DIR",
                    help="measure the models a --stage run built (instead of MODEL), with TVM's runtime alone")
    ap.add_argument("--bits", default="4,8", metavar="B,B", help="candidate widths, each as WbAb (default 4,8)")
    ap.add_argument("--widths", default="1.0", metavar="C,C",
                    help="width multipliers to profile, for sweeps (default 1.0; other widths re-initialise)")
    ap.add_argument("--batch", type=int, default=1, help="batch size the latencies are for (default 1)")
    ap.add_argument("--rounds", type=int, default=31, help="profiled runs per model (medians; default 31)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help=f"runtime threads (default: the logical cores, {os.cpu_count()})")
    ap.add_argument("--model-arg", dest="model_args", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--leaf-module", dest="leaf_modules", action="append", default=[], metavar="NAME")
    ap.add_argument("--out", required=True, help="the profile file to write (JSON)")
    return ap


def check_profile_args(args: argparse.Namespace) -> None:
    if args.batch < 1 or args.rounds < 1 or args.threads < 1:
        raise QCompileError("--batch, --rounds and --threads must be at least 1")
    if (args.model is None) == (args.staged is None):
        both = ", not both" if args.model is not None else ""
        raise QCompileError(f"give a model file or --staged DIR (the models a --stage run built){both}")
    if args.stage and (args.backend != "tvm" or args.staged):
        raise QCompileError("--stage builds TVM artifacts: it needs --backend tvm and a model file")
    if args.backend != "tvm" or args.staged:
        return
    from qcompile.backends.tvm.targets import get_target, host_cpu_target

    args.target = args.target or host_cpu_target()
    spec = get_target(args.target)
    if not args.stage and not spec.host_can_run():
        lacks = "no NVIDIA GPU here" if spec.is_cuda else f"this CPU lacks {', '.join(spec.cpu_flags)}"
        raise QCompileError(f"--target {args.target} cannot run on this machine ({lacks}): build with --stage DIR, "
                            "then run qcompile profile --staged DIR on a machine that runs it")


def check_train_args(command: str, args: argparse.Namespace) -> None:
    """Refuse, before any work, training settings out of range or flags that contradict each other."""
    if args.epochs < 1 or args.batch_size < 1:
        raise QCompileError("--epochs and --batch-size must be at least 1")
    if not 0 < args.observe_fraction <= 1:
        raise QCompileError(f"--observe-fraction must be in (0, 1], got {args.observe_fraction}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise QCompileError(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.momentum < 1:
        raise QCompileError(f"--momentum must be in [0, 1), got {args.momentum}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise QCompileError(f"--weight-decay must be a number >= 0, got {args.weight_decay}")
    if min(args.train_size or 0, args.eval_size or 0, args.train_eval_size, args.verify_size) < 0:
        raise QCompileError("--train-size, --eval-size, --train-eval-size and --verify-size must not be negative")
    if command == "train" and args.width is not None and args.weights:
        raise QCompileError("--weights cannot be combined with --width: width_scale re-initialises every layer")


def parse_widths(text: str) -> list[float]:
    """``--widths 0.5,1.0`` → [0.5, 1.0]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise QCompileError(f"--widths {text!r}: expected comma-separated numbers, e.g. 0.5,1.0,2.0") from None
    if not values or any(v <= 0 for v in values):
        raise QCompileError(f"--widths {text!r}: widths must be positive")
    return values


def in_flags(exc: QCompileError) -> str:
    """The one-line message of a user error, a library parameter it names worded as the flag that gives it."""
    return exc.worded(FLAGS)
