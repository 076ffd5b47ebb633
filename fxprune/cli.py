"""The ``fxprune`` command: prune a model, time ONNX files, explain a model's groups, run the demo.

Every mistake in what was typed (a model that cannot be imported, a bad ``--input``, a config
that does not parse or validate) is one line on stderr naming the problem and the fix, with exit
code 2; ``--debug`` shows the traceback instead. Arguments, the config and the model are checked
before capture, pruning or export start, so such mistakes are reported before minutes of work.
Warnings are one line each too; third-party deprecation notices are hidden unless ``--debug``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import json
import os
import sys
import traceback
import warnings

__all__ = ["main", "parse_input_spec"]

_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_INT_DTYPES = ("int64", "int32")
_DTYPES = _FLOAT_DTYPES + _INT_DTYPES + ("bool",)
_DEFAULT_TOKEN_RANGE = 100  # integer inputs of a model without an input embedding

_EXAMPLES = """\
examples:
  fxprune prune mymodels:build --input 1x3x224x224 --config '{"target_sparsity": 0.5}' --out pruned
  fxprune prune mymodels:bert --input 1x128:int64 --config prune.yaml --out pruned-bert
  fxprune bench pruned/dense.onnx pruned/compact.onnx --threads 1 2 --batch 1 8 --plot latency.png
  fxprune explain mymodels:build --input 1x3x224x224
  fxprune sweep mymodels:build --input 1x3x224x224 --sparsities 0.25 0.5 0.75 --plot sweep.png
  fxprune demo --sparsity 0.5

MODULE:FACTORY is imported from the current folder (mymodels.py there, or an installed
package); FACTORY is called with no arguments and returns the torch.nn.Module.
'fxprune COMMAND --help' describes each command."""

_SPEC_HELP = ("example input: a shape such as 1x3x224x224 (float32, standard normal values) or 1x128:int64 "
              "(token ids, see below); dtypes: " + ", ".join(_DTYPES) + ". Repeat --input for each positional "
              "input of forward()")

_INT_HELP = (f"Integer inputs (:int64, :int32) are token ids drawn in [0, V): V is the num_embeddings of the "
             f"model's input embedding (get_input_embeddings(), else its first nn.Embedding), or "
             f"{_DEFAULT_TOKEN_RANGE} when it has none. :bool inputs are all True (an attention mask that keeps "
             "everything). Values are drawn with seed 0.")

_PRUNE_EPILOG = f"""\
{_INT_HELP}

Without fine-tuning data this is one-shot pruning (pruning.prune()): channels are chosen by the
configured pruner's scores of the weights as they are, with no training. To prune while
fine-tuning, use the Python API (fxprune.compile, pruning.attach(optimizer)).

--config takes inline JSON, or a .json, .yaml or .yml file, with the keys of the README's
config table; without it the defaults apply (magnitude, target_sparsity 0.5).

It writes to --out: dense.onnx and compact.onnx (each checked against onnxruntime), compact.pt2
(fxprune.load_compact reloads it), plan.json (pruning.apply_plan rebuilds the same compact model)
and report.txt (the per-layer report, also printed). The batch stays dynamic in every file.

examples:
  fxprune prune mymodels:build --input 1x3x224x224 --config '{{"target_sparsity": 0.5}}' --out pruned
  fxprune prune mymodels:bert --input 1x128:int64 --config prune.yaml --out pruned-bert"""

_BENCH_EPILOG = """\
Runs are interleaved model by model (fxprune.benchmark), so drift affects every model alike;
speedups are relative to the first file. Inputs are random, as fxprune.benchmark makes them
(floats standard normal, integers in [0, 4), bools False); a dynamic batch dim takes each --batch
value (default 1); other dynamic dims need --dim NAME=SIZE.

examples:
  fxprune bench pruned/dense.onnx pruned/compact.onnx --threads 1 2 --batch 1 8
  fxprune bench dense.onnx compact.onnx --dim seq=128 --plot latency.png   (--plot: pip install fxprune[plot])"""

_SWEEP_EPILOG = f"""\
Each point is a fresh one-shot prune (pruning.prune()) of the model with --config and that
target_sparsity (or, with --target-speedups, that target_speedup), compacted and exported; the
dense model and every point are then timed together, interleaved (fxprune.sweep). The table has
the speedup over the dense model and the ideal one (dense MACs / compact MACs). --batch times
another batch than the example's (the capture keeps the batch dynamic). --config must not set the
target that the sweep sets.

{_INT_HELP}

examples:
  fxprune sweep mymodels:build --input 1x3x224x224 --sparsities 0.25 0.5 0.75 --threads 1 2
  fxprune sweep mymodels:build --input 1x3x224x224 --target-speedups 1.5 2 3 --plot sweep.png"""

_EXPLAIN_EPILOG = f"""\
{_INT_HELP}

--graph draws the groups over the model's layers: .html (a picture to hover, and tables of the
groups and of the frozen dims with their reasons; no network needed), .svg or .png (the picture;
these three need matplotlib: pip install fxprune[plot]) or .dot (Graphviz, no extra needed).

examples:
  fxprune explain mymodels:build --input 1x3x224x224
  fxprune explain mymodels:build --input 1x3x224x224 --graph groups.html
  fxprune explain mymodels:bert --input 1x128:int64"""

_DEMO_EPILOG = """\
examples:
  fxprune demo
  fxprune demo --sparsity 0.75 --pruner magnitude --out demo-onnx"""


class UsageError(Exception):
    """Something the user typed or pointed at is wrong; the message says what and how to fix it."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (the usage is one ``--help`` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# -- argument types (no torch needed) --------------------------------------------------------
def parse_input_spec(text: str) -> tuple[tuple[int, ...], str]:
    """``"1x3x224x224"`` -> ``((1, 3, 224, 224), "float32")``; ``"1x128:int64"`` -> ``((1, 128), "int64")``."""
    shape_text, _, dtype = text.strip().partition(":")
    dtype = dtype.strip().lower() or "float32"
    if dtype not in _DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r}: unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}, "
                                         "e.g. 1x128:int64")
    parts = shape_text.lower().replace(",", "x").split("x")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: write positive sizes joined by 'x', with an "
                                         "optional :dtype, e.g. 1x3x224x224 or 1x128:int64")
    return tuple(int(p) for p in parts), dtype


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in [0, 1): 0.5 removes half the channels")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _dim_size(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or not name.strip() or not size.strip().isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=SIZE for a dynamic dim, e.g. seq=128")
    return name.strip(), int(size)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fxprune")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxprune", description="Structured pruning for PyTorch: capture, group channels, prune, "
                     "compact, export to ONNX, time with onnxruntime.", epilog=_EXAMPLES,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fxprune {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def command(name: str, help: str, epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, epilog=epilog, parents=[common],
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    def model_arguments(p: argparse.ArgumentParser) -> None:
        """MODULE:FACTORY and --input, as prune and sweep take them."""
        p.add_argument("factory", metavar="MODULE:FACTORY", help="module:callable that returns the model, e.g. "
                       "mymodels:build (imported from the current folder)")
        p.add_argument("--input", type=parse_input_spec, action="append", required=True, metavar="SPEC",
                       help=_SPEC_HELP)

    prune = command("prune", "one-shot prune a model; write dense/compact ONNX, compact.pt2, plan.json, report.txt",
                    _PRUNE_EPILOG)
    model_arguments(prune)
    prune.add_argument("--config", metavar="FILE_OR_JSON", help="pruning config: inline JSON or a .json/.yaml file "
                       "(default: the library's defaults)")
    prune.add_argument("--out", required=True, metavar="DIR", help="folder for the files (created if missing)")

    bench = command("bench", "onnxruntime latency of ONNX files, interleaved, as a table", _BENCH_EPILOG)
    bench.add_argument("models", nargs="+", metavar="MODEL.onnx", help="ONNX files with the same inputs; the first "
                       "is the baseline")
    bench.add_argument("--threads", type=_positive_int, nargs="+", default=[1, 2], help="intra-op thread counts "
                       "(default 1 2)")
    bench.add_argument("--batch", type=_positive_int, nargs="+", default=None, help="batch sizes for a dynamic batch "
                       "dim (default: 1, or the files' fixed batch)")
    bench.add_argument("--dim", type=_dim_size, action="append", default=[], metavar="NAME=SIZE",
                       help="size of another dynamic dim, by its name in the ONNX file (e.g. seq=128)")
    bench.add_argument("--repeat", type=_positive_int, default=50, help="timed rounds (default 50)")
    bench.add_argument("--warmup", type=_positive_int, default=10, help="untimed runs first (default 10)")
    bench.add_argument("--plot", metavar="FILE.png", help="also draw the medians as a bar chart (needs matplotlib: "
                       "pip install fxprune[plot])")

    exp = command("explain", "show a model's channel groups and why other channels are frozen", _EXPLAIN_EPILOG)
    exp.add_argument("factory", metavar="MODULE:FACTORY", help="module:callable that returns the model, e.g. "
                     "mymodels:build (imported from the current folder)")
    exp.add_argument("--input", type=parse_input_spec, action="append", metavar="SPEC",
                     help=_SPEC_HELP + " (default 1x3x224x224)")
    exp.add_argument("--graph", metavar="FILE", help="also draw the groups over the layers: FILE.html, .svg, .png "
                     "(need pip install fxprune[plot]) or .dot")

    sweep = command("sweep", "prune at several sparsities or speedup targets; time each compact model beside the "
                    "dense one", _SWEEP_EPILOG)
    model_arguments(sweep)
    sweep.add_argument("--config", metavar="FILE_OR_JSON", help="one pruner's config without its target: inline "
                       "JSON or a .json/.yaml file (default: the library's defaults)")
    points = sweep.add_mutually_exclusive_group(required=True)
    points.add_argument("--sparsities", type=_fraction, nargs="+", metavar="S", help="target sparsities in [0, 1)")
    points.add_argument("--target-speedups", type=float, nargs="+", metavar="X", help="target speedups above 1 "
                        "(latency-target configs: the per-layer tables are timed first, then cached)")
    sweep.add_argument("--threads", type=_positive_int, nargs="+", default=[1], help="intra-op thread counts "
                       "(default 1)")
    sweep.add_argument("--batch", type=_positive_int, default=None, help="batch timed (default the example's)")
    sweep.add_argument("--repeat", type=_positive_int, default=30, help="timed rounds (default 30)")
    sweep.add_argument("--warmup", type=_positive_int, default=10, help="untimed runs first (default 10)")
    sweep.add_argument("--plot", metavar="FILE.png", help="also draw latency and speedup against the points (needs "
                       "matplotlib: pip install fxprune[plot])")
    sweep.add_argument("--out", metavar="DIR", help="keep the ONNX files here (default: a temporary folder)")

    demo = command("demo", "digits CNN: train, prune during fine-tune, compact, ONNX, latency", _DEMO_EPILOG)
    demo.add_argument("--sparsity", type=_fraction, default=0.5, help="fraction of channels to remove, in [0, 1) "
                      "(default 0.5)")
    demo.add_argument("--pruner", default="snip_momentum", help="registered pruner (default snip_momentum)")
    demo.add_argument("--steps", type=_positive_int, default=300, help="dense training steps")
    demo.add_argument("--finetune-steps", type=_positive_int, default=300, help="fine-tuning steps while pruning")
    demo.add_argument("--threads", type=_positive_int, nargs="+", default=[1, 2], help="onnxruntime intra-op threads")
    demo.add_argument("--batch", type=_positive_int, default=64, help="batch size of the exported models")
    demo.add_argument("--repeat", type=_positive_int, default=30, help="timed runs per model and thread count")
    demo.add_argument("--round-to", type=_positive_int, default=8, help="kept channels are multiples of this")
    demo.add_argument("--out", default=None, help="folder for the ONNX files (default: a temp folder)")
    return parser


# -- the model, its inputs, the config ------------------------------------------------------
def load_model(spec: str):
    """Import ``module:factory`` (from the current folder first) and call the factory; return the model."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name.strip() or not attr.strip():
        raise UsageError(f"{spec!r} is not MODULE:FACTORY: name the module and the callable that builds the model, "
                         "e.g. mymodels:build for build() in mymodels.py in the current folder")
    here = os.getcwd()
    if module_name.endswith(".py"):  # a path to a file: import it from its folder
        here, module_name = os.path.split(os.path.abspath(module_name))
        module_name = module_name[:-3]
    if os.path.abspath(here) not in [os.path.abspath(p or os.curdir) for p in sys.path]:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise UsageError(f"cannot import {module_name!r}: there is no {module_name.replace('.', '/')}.py (or "
                             f"package) in {here} or on the Python path; run fxprune from the folder that holds it, "
                             "or install the package") from err
        raise UsageError(f"importing {module_name!r} failed: {err}{_where(err)}; install the module it needs") from err
    except Exception as err:
        raise UsageError(f"importing {module_name!r} failed: {type(err).__name__}: {err}{_where(err)}") from err
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if not n.startswith("_") and callable(v)
                           and getattr(v, "__module__", None) == module.__name__)
            close = difflib.get_close_matches(attr, names, 1)
            hint = f"did you mean {module_name}:{close[0]}? " if close else ""
            raise UsageError(f"{module_name} has no attribute {attr!r}; {hint}callables defined in "
                             f"{module_name}: {', '.join(names) or 'none'}")
        obj = getattr(obj, part)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.nn.Module):
        return obj  # a model object, not a factory
    if not callable(obj):
        kind = type(obj).__name__
        raise UsageError(f"{module_name}:{attr} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a callable; "
                         "name a function or class that returns the model when called with no arguments")
    required = _required_parameters(obj)
    if required:
        raise UsageError(f"{module_name}:{attr} needs arguments ({', '.join(required)}), but FACTORY is called with "
                         f"none; give them defaults or add a function that builds the model, e.g. "
                         f"def build(): return {attr}(...)")
    try:
        model = obj()
    except Exception as err:
        raise UsageError(f"{module_name}:{attr}() raised {type(err).__name__}: {err}{_where(err)}") from err
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(model, torch.nn.Module):
        kind = type(model).__name__
        raise UsageError(f"{module_name}:{attr}() returned {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a "
                         "torch.nn.Module; FACTORY must return the model")
    return model


def _required_parameters(fn) -> list[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.default is p.empty
            and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _where(err: BaseException) -> str:
    """`` (at file:line)`` of the innermost frame of ``err`` (the user's code), or of a SyntaxError's line."""
    if isinstance(err, SyntaxError) and err.filename:
        return f" (at {err.filename}:{err.lineno})"
    frames = traceback.extract_tb(err.__traceback__)
    frames = [f for f in frames if "importlib" not in f.filename and "<frozen" not in f.filename]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def make_inputs(specs, model) -> tuple:
    """Random example tensors for ``specs``; integer ones are token ids the model's embedding accepts."""
    import torch

    gen = torch.Generator().manual_seed(0)
    high = None
    inputs = []
    for shape, dtype in specs:
        if dtype in _FLOAT_DTYPES:
            inputs.append(torch.randn(shape, generator=gen).to(getattr(torch, dtype)))
        elif dtype == "bool":
            inputs.append(torch.ones(shape, dtype=torch.bool))
        else:
            if high is None:
                high, source = token_range(model)
                print(f"fxprune: integer inputs are token ids in [0, {high}) ({source})", file=sys.stderr)
            inputs.append(torch.randint(0, high, shape, generator=gen, dtype=getattr(torch, dtype)))
    return tuple(inputs)


def token_range(model) -> tuple[int, str]:
    """``(V, where V came from)``: token ids in [0, V) are valid for ``model``'s input embedding."""
    import torch

    embedding = None
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            embedding = get()
        except Exception:  # a base class stub (NotImplementedError) or a model without one
            embedding = None
    if isinstance(embedding, torch.nn.Embedding):
        return embedding.num_embeddings, "the size of get_input_embeddings()"
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            return module.num_embeddings, f"the size of the first nn.Embedding, {name}"
    return _DEFAULT_TOKEN_RANGE, "the model has no nn.Embedding"


def read_config(text: str | None) -> dict:
    """``--config``: inline JSON, or a .json / .yaml / .yml file, as a dict (not yet validated)."""
    if text is None:
        return {}
    if text.lstrip().startswith("{"):
        source = "inline JSON"
        try:
            config = json.loads(text)
        except json.JSONDecodeError as err:
            raise UsageError(f"--config: the inline JSON is malformed ({err.msg} at column {err.colno}); quote it "
                             """for the shell, e.g. --config '{"target_sparsity": 0.5}'""") from err
    else:
        source = text
        if not os.path.isfile(text):
            raise UsageError(f"--config {text}: no such file; pass a .json or .yaml file, or inline JSON such as "
                             """'{"target_sparsity": 0.5}'""")
        with open(text, encoding="utf-8") as f:
            body = f.read()
        if text.lower().endswith((".yaml", ".yml")):
            import yaml

            try:
                config = yaml.safe_load(body)
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
                raise UsageError(f"--config {text}: not valid YAML{where} ({getattr(err, 'problem', None) or err})"
                                 ) from err
        else:
            try:
                config = json.loads(body)
            except json.JSONDecodeError as err:
                also = "" if text.lower().endswith(".json") else "; name a YAML file .yaml or .yml"
                raise UsageError(f"--config {text}: not valid JSON ({err.msg} at line {err.lineno}, column "
                                 f"{err.colno}){also}") from err
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise UsageError(f"--config {source}: expected a mapping of config keys (e.g. target_sparsity: 0.5), got a "
                         f"{type(config).__name__}")
    return config


# -- commands ----------------------------------------------------------------------------------
def _prune(args) -> int:
    config = read_config(args.config)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; name a folder (it is created if missing)")
    if config:
        import fxprune

        fxprune.parse_config(config)  # a bad key fails before the model is built
    model = load_model(args.factory)
    inputs = make_inputs(args.input, model)

    from tqdm import tqdm

    import fxprune
    from fxprune.exporters.onnx_export import check_exportable

    try:
        check_exportable(model, inputs)  # before minutes of work, not after
    except fxprune.OnnxExportError as err:
        what = str(err).partition(":")[0]  # "ONNX export of bfloat16 is not supported (... e.g. x)"
        raise UsageError(f"prune writes ONNX files, and {what}: ONNX opset 18 and onnxruntime's CPU kernels do not "
                         "take it; have FACTORY return a float32 model (model.float()) and give float32 --input "
                         "specs") from err

    out = args.out
    path = {name: os.path.join(out, name) for name in
            ("dense.onnx", "compact.onnx", "compact.pt2", "plan.json", "report.txt")}
    with tqdm(total=5, unit="stage", disable=not sys.stderr.isatty(), leave=False,
              bar_format="{desc:<34} {bar} {n_fmt}/{total_fmt} [{elapsed}]") as bar:
        def stage(desc: str) -> None:
            bar.set_description_str(desc)
            bar.refresh()

        stage("capture and group channels")
        pruning = fxprune.compile(model.eval(), inputs, config, progress=False)
        bar.update()
        stage("prune (one shot)")
        pruning.prune()
        bar.update()
        stage("compact and check")
        small = pruning.compact(progress=False)
        report = pruning.report()
        bar.update()
        os.makedirs(out, exist_ok=True)
        pruning.save_plan(path["plan.json"])
        with open(path["report.txt"], "w", encoding="utf-8") as f:
            f.write(f"{report}\n")
        fxprune.save_compact(small, path["compact.pt2"], inputs)
        stage("export dense.onnx")
        dense = fxprune.export_onnx(pruning.captured.graph_module, path["dense.onnx"], inputs, progress=False)
        bar.update()
        stage("export compact.onnx")
        compact = fxprune.export_onnx(small, path["compact.onnx"], inputs, progress=False)
        bar.update()

    print(report)
    print(f"compact model == masked model (max abs error {pruning.compact_error:.1e}); "
          f"{pruning.sparsity:.1%} of channels removed, {report.macs_ratio:.2f}x fewer MACs")
    print(f"wrote {out}{os.sep}:")
    for name in path:
        size = os.path.getsize(path[name])
        note = {"dense.onnx": dense, "compact.onnx": compact}.get(name)
        check = f"  onnxruntime == torch, max abs error {note.max_abs_error:.1e}" if note else ""
        print(f"  {name:<13} {_size(size):>9}{check}")
    print(f"time them: fxprune bench {path['dense.onnx']} {path['compact.onnx']} --threads 1 2 --batch 1 8")
    return 0


def _size(n: int) -> str:
    return f"{n} B" if n < 1000 else f"{n / 1e3:.1f} kB" if n < 1e6 else f"{n / 1e6:.2f} MB"


def _bench(args) -> int:
    for model in args.models:
        if not os.path.isfile(model):
            raise UsageError(f"{model}: no such ONNX file; write one with 'fxprune prune' or fxprune.export_onnx")
    if args.plot:
        _require_matplotlib("--plot")
    labels = _labels(args.models)
    dims = dict(args.dim)

    import onnxruntime as ort

    sessions = {}
    for label, path in zip(labels, args.models):
        try:
            sessions[label] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime's own exception types
            raise UsageError(f"{path}: onnxruntime cannot load it ({_one_line(err)[:300]}); pass an ONNX file") from err
    base = labels[0]
    names = {label: [m.name for m in session.get_inputs()] for label, session in sessions.items()}
    for label, path in zip(labels, args.models):
        if names[label] != names[base]:
            raise UsageError(f"{path} takes inputs {names[label]}, {args.models[0]} takes {names[base]}: the files "
                             "must take the same inputs")

    from fxprune.exporters import benchmark
    from fxprune.exporters.ort_benchmark import plot_benchmarks

    results, titles = [], []
    for batch in args.batch or [None]:
        feed = _random_feed(sessions[base], args.models[0], batch, dims)
        result = benchmark(dict(zip(labels, args.models)), threads=args.threads, warmup=args.warmup,
                           repeat=args.repeat, inputs=feed)
        print(f"onnxruntime latency, inputs {result.input_summary}:")
        print(result)
        print()
        results.append(result)
        titles.append(f"batch {batch}" if batch else result.input_summary)
    if args.plot:
        plot_benchmarks(results, args.plot, titles)
        print(f"plot: {args.plot}")
    return 0


def _sweep(args) -> int:
    config = read_config(args.config)
    if args.plot:
        _require_matplotlib("--plot")
    import fxprune

    if config:
        fxprune.parse_config(config)  # a bad key fails before the model is built
    model = load_model(args.factory)
    inputs = make_inputs(args.input, model)
    result = fxprune.sweep(model.eval(), inputs, config, sparsities=args.sparsities,
                           target_speedups=args.target_speedups, threads=args.threads, batch=args.batch,
                           warmup=args.warmup, repeat=args.repeat, folder=args.out)
    print(f"onnxruntime latency, inputs {result.timing.input_summary}; dense {result.dense_macs / 1e6:.1f} M MACs:")
    print(result)
    if args.plot:
        result.plot(args.plot)
        print(f"plot: {args.plot}")
    return 0


def _require_matplotlib(option: str) -> None:
    """Before any timing or capture: a missing extra is a one-line error, not a traceback minutes later."""
    from fxprune.plots import pyplot

    try:
        pyplot(option)
    except ImportError as err:
        raise UsageError(str(err)) from err


def _labels(paths: list[str]) -> list[str]:
    """Model labels: file names without .onnx, or the paths where names repeat."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    if len(set(paths)) != len(paths):
        raise UsageError(f"a file is given twice: {paths}")
    return list(paths)


def _random_feed(session, path: str, batch: int | None, dims: dict[str, int]) -> dict:
    """Random inputs (as ``fxprune.benchmark`` makes them) of the shapes ``path`` declares: a dynamic dim 0 or
    ``batch`` dim takes ``batch`` (1 if None), other dynamic dims the sizes in ``dims``."""
    from fxprune.exporters.ort_benchmark import _random_inputs

    for meta in session.get_inputs():
        fixed = meta.shape[0] if meta.shape else None
        if batch is not None and isinstance(fixed, int) and fixed > 0 and fixed != batch:
            raise UsageError(f"{path} has a fixed batch of {fixed} (input {meta.name}: {meta.shape}); pass "
                             f"--batch {fixed}, or export it with a dynamic batch (the default of fxprune)")

    def size_of(meta, i: int, dim) -> int:
        if isinstance(dim, str) and dim in dims:
            return dims[dim]
        if i == 0 or dim == "batch":
            return batch or 1
        raise UsageError(f"{path}: input {meta.name} has a dynamic dim {i} named {dim!r}; give its size with "
                         f"--dim {dim}=SIZE")

    return _random_inputs(session, 0, size_of)


def _explain(args) -> int:
    if args.graph:
        from fxprune.group_graph import graph_format

        try:
            ext = graph_format(args.graph)
        except ValueError as err:
            raise UsageError(f"--graph {err}") from err
        if ext != ".dot":
            _require_matplotlib(f"--graph {ext}")
    model = load_model(args.factory)
    inputs = make_inputs(args.input or [parse_input_spec("1x3x224x224")], model)

    from fxprune.explain import explain

    explanation = explain(model.eval(), inputs)
    print(explanation)
    if args.graph:
        explanation.draw(args.graph)
        print(f"graph: {args.graph}")
    return 0


def _demo(args) -> int:
    import fxprune
    from fxprune.demo import run_demo

    fxprune.parse_config({"pruning_type": args.pruner, "target_sparsity": args.sparsity})  # before any training
    run_demo(sparsity=args.sparsity, pruner=args.pruner, steps=args.steps, finetune_steps=args.finetune_steps,
             threads=args.threads, batch=args.batch, repeat=args.repeat, round_to=args.round_to, out_dir=args.out)
    return 0


_COMMANDS = {"prune": _prune, "bench": _bench, "explain": _explain, "sweep": _sweep, "demo": _demo}


# -- errors ------------------------------------------------------------------------------------
def _is_user_error(err: BaseException) -> bool:
    """Errors fxprune raises on purpose: its own hierarchy, OS errors (files), and the TypeError /
    ValueError that fxprune's own code raises about an argument (not one from deep inside torch)."""
    if isinstance(err, (UsageError, OSError)):
        return True
    errors = sys.modules.get("fxprune.errors")
    if errors is not None and isinstance(err, errors.FxPruneError):
        return True
    if isinstance(err, (TypeError, ValueError)):
        frames = traceback.extract_tb(err.__traceback__)
        return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_fxprune_dirs())
    return False


def _fxprune_dirs() -> tuple[str, ...]:
    names = ("fxprune", "fxprune.passes", "fxprune.exporters")
    files = [getattr(sys.modules.get(n), "__file__", None) for n in names]
    return tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in files if f)


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        with warnings.catch_warnings():
            if not debug:  # third-party deprecation notices are not the user's to act on; the rest take one line
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.simplefilter("ignore", FutureWarning)
                warnings.showwarning = lambda message, *_, **__: print(
                    f"fxprune {args.command}: warning: {_one_line(message)}", file=sys.stderr)
            return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"fxprune {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not _is_user_error(err):
            raise
        print(f"fxprune {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
