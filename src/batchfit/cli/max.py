"""``batchfit max``: the largest batch size that fits the memory."""

from __future__ import annotations

import argparse

from rich.console import Console

from ..core.confirm import DEFAULT_CONFIRMATIONS
from ..core.search import DEFAULT_SEARCH, POLICY_NAMES, check_search
from ..core.settle import PROBE_STEPS
from ..errors import InvalidInputError
from ._common import (
    DEMO_MEMORY,
    DEMO_MODEL,
    add_debug_argument,
    add_model_argument,
    parse_input_shapes,
    warn,
    write_outputs,
)
from .verify import add_verify_option, verify_answer

HELP = "the largest batch size that fits the memory"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("max", help=HELP,
                       description="Find the largest batch size that trains within a memory "
                                   "budget, with real training steps.")
    add_model_argument(p)
    add_search_arguments(p, headroom=0.0)
    p.add_argument("--confirm", type=int, default=DEFAULT_CONFIRMATIONS, metavar="K",
                   help=f"run the answer again in K fresh processes, stepping down on any "
                        f"failure (default {DEFAULT_CONFIRMATIONS}; 0 skips it)")
    p.add_argument("--jit", action="store_true",
                   help="XLA-compile the training step (jit_compile=True); an XLA step's search "
                        "starts where its compile-time memory predicts the limit")
    p.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    p.add_argument("--quiet", action="store_true", help="no per-probe lines")
    add_verify_option(p)
    add_debug_argument(p)


def add_search_arguments(p: argparse.ArgumentParser, *, steps: bool = True,
                         headroom: float = 0.1) -> None:
    """Options of the memory search, shared with ``tune`` (whose search has no ``steps=``;
    ``headroom``: the default of ``--headroom``)."""
    p.add_argument("--memory", help="budget, e.g. 16GiB or 512MiB (default: the device's memory)")
    p.add_argument("--search", default=None, choices=POLICY_NAMES,
                   help=f"the memory search policy (default {DEFAULT_SEARCH})")
    p.add_argument("--strategy", default=None, metavar="{" + ",".join(POLICY_NAMES) + "}",
                   help="deprecated name of --search (goes in the next release)")
    p.add_argument("--granularity", type=int, default=1, help="search multiples of N (default 1)")
    p.add_argument("--search-tolerance", type=float, default=None, metavar="FRACTION",
                   help="guided search: stop once the answer is within this fraction below "
                        "the smallest failure (default 0.05 when confirmations follow, which "
                        "settle the edge, else 0.02; 0 for an exact bracket)")
    p.add_argument("--max-batch", type=int, default=None, help="never try a larger batch")
    if headroom:
        text = f"fraction of the budget the safe size leaves free (default {headroom:g})"
    else:
        text = ("least fraction of the budget the safe size leaves free (default 0: a margin "
                "sized from the measured band, at least 3%%)")
    p.add_argument("--headroom", type=float, default=headroom, help=text)
    if steps:
        p.add_argument("--steps", type=int, default=PROBE_STEPS,
                       help=f"training steps per epoch of a probe (default {PROBE_STEPS}: with "
                            f"fewer, Keras's data pipeline has stopped fetching and the steps "
                            f"need less than an epoch of many batches; a probe runs epochs "
                            f"until its peak stops rising, at most 8)")
    p.add_argument("--data", help="path/file.py:function returning (x, y) or a tf.data.Dataset")
    p.add_argument("--input-shape", action="append", metavar="[NAME=]DIMS",
                   help="length of None dimensions, e.g. tokens=128 (repeatable)")
    p.add_argument("--isolate", default="auto", choices=["auto", "process", "none"])
    p.add_argument("--device", default=None, help="CPU:0 or GPU:0 (default: GPU if present)")
    p.add_argument("--distribute", default=None, metavar="mirrored|multiworker",
                   help="train under tf.distribute: memory is searched per replica (--memory "
                        "is one device's), and the global batch (per replica x replicas) is "
                        "reported too")


def search_option(args: argparse.Namespace) -> str:
    """``--search``, or its deprecated alias ``--strategy`` (with a warning on stderr)."""
    if args.strategy is None:
        return args.search or DEFAULT_SEARCH
    if args.strategy in ("mirrored", "multiworker"):
        raise InvalidInputError(
            f"--strategy (now --search) is the memory search policy ({', '.join(POLICY_NAMES)}), "
            f"not tf.distribute: to train under a {args.strategy} strategy pass --distribute "
            f"{args.strategy}")
    if args.search is not None:
        raise InvalidInputError("give --search only: --strategy is its deprecated old name")
    warn("--strategy is deprecated and will be removed in the next release: use --search")
    return check_search(args.strategy, name="--strategy")


def resolve_model(args: argparse.Namespace, console: Console) -> tuple[str, str | None]:
    """The MODEL and memory to use: the built-in example on an emulated device when none given."""
    model, memory = args.model, args.memory
    if model is None:
        model = DEMO_MODEL
        memory = memory or DEMO_MEMORY
        console.print(f"[dim]no MODEL given: the built-in example {DEMO_MODEL} on an emulated "
                      f"{memory} device[/dim]", highlight=False)
    return model, memory


def run(args: argparse.Namespace, console: Console) -> int:
    from ..report import ProbeLog, render_max
    from ..verbs.maxbatch import find_max_batch_size

    model, memory = resolve_model(args, console)
    result = find_max_batch_size(
        model, memory=memory, search=search_option(args), granularity=args.granularity,
        data=args.data, input_shapes=parse_input_shapes(args.input_shape),
        upper=args.max_batch, headroom=args.headroom, steps=args.steps, isolate=args.isolate,
        device=args.device, on_probe=None if args.quiet else ProbeLog(console),
        distribute=args.distribute, search_tolerance=args.search_tolerance,
        confirm=args.confirm, jit=args.jit)
    render_max(result, console, show_probes=args.quiet)
    write_outputs(result, console, json_path=args.json)
    return verify_answer(args, console, model, result.max_batch_size,
                         result.memory_budget_bytes, result.device, result.replicas)
