"""``python -m training export CHECKPOINT --format hf|gguf|ollama [--quantization Q] [--output DIR]``.

Progress goes to stderr as ``export: [ 42%] message`` lines (the Tavern's export job reads them); the last
line on stdout is the path written (hf: the folder, gguf: the ``.gguf`` file, ollama: the ``Modelfile``).
Exit codes (:class:`training.cli.ExitCode`): 0 written, 1 refused (unsupported architecture or chat
template, damaged checkpoint, ``--output`` exists), 2 usage (format, quantization), 5 no such checkpoint,
10 filesystem error; SIGTERM/SIGINT stop it with nothing left behind (143/130).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from core.checkpoint_layout import EXAMPLE_NAME
from core.exports import DEFAULT_QUANTIZATION, FORMATS, QUANTIZATIONS

PROGRESS_PREFIX = "export: "


def add_parsers(sub) -> None:
    """Register ``export`` and ``chat`` on the CLI's subparsers."""
    s = sub.add_parser("export", help="export a checkpoint as a Hugging Face folder, a GGUF file or an Ollama model")
    s.add_argument("checkpoint", help=f"latest, best, base, a global step (1234 or {EXAMPLE_NAME}) or a version name")
    s.add_argument("--format", required=True, choices=FORMATS, dest="export_format")
    s.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                   help=f"GGUF tensor type for gguf/ollama (default {DEFAULT_QUANTIZATION}; norms stay f32)")
    s.add_argument("--output", help="the export folder to create (default: exports/<hero>-<checkpoint>-<format>...)")
    s = sub.add_parser("chat", help="chat with a checkpoint in the terminal (streamed; /reset, /save, /quit)")
    s.add_argument("--checkpoint", default="latest", help="latest (default), best, base, a global step or a version")
    s.add_argument("--system", help="a system message at the start of every conversation")
    s.add_argument("--temperature", type=float, default=0.7, help="0: greedy (default 0.7)")
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")


class _Progress:
    """Prints ``export: [ 42%] message`` on stderr, at most one line per percent."""

    def __init__(self):
        self.last = -1

    def __call__(self, fraction: float, message: str) -> None:
        percent = round(100 * fraction)
        if percent != self.last:
            self.last = percent
            print(f"{PROGRESS_PREFIX}[{percent:3d}%] {message}", file=sys.stderr, flush=True)


def _stop_on_sigterm() -> None:
    def _raise(signum, frame):
        raise SystemExit(128 + signum)  # unwinds: the temporary folder is removed

    signal.signal(signal.SIGTERM, _raise)


def cmd_export(args: argparse.Namespace, realm, config, environ) -> int:
    from transformers.utils import logging as hf_logging

    from core.ledger import Ledger
    from management.export import ExportError, ExportUsageError, SourceNotFound, export_checkpoint
    from training.cli import ExitCode

    hf_logging.disable_progress_bar()  # no "Loading weights" bars between the lines of the command
    logging.getLogger("gguf").setLevel(logging.WARNING)
    _stop_on_sigterm()
    realm.ensure_layout()
    ledger = Ledger(realm.ledger_path)
    try:
        result = export_checkpoint(realm, config, ledger, args.checkpoint, args.export_format,
                                   quantization=args.quantization, output=args.output, progress=_Progress())
    except ExportUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except SourceNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.NOT_FOUND
    except ExportError as exc:
        print(f"error: export refused: {exc}", file=sys.stderr)
        return ExitCode.REJECTED
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    finally:
        ledger.close()
    m = result.manifest
    print(f"{m['source']['name']} exported as {m['format']}" + (f" ({m['quantization']})" if m["quantization"] else "")
          + f" to {result.folder}")
    if m["format"] == "ollama":
        print(f"import it: ollama create {config.hero.name} -f {result.path}")
    print(result.path)
    return ExitCode.OK


def cmd_chat(args: argparse.Namespace, realm, config, environ) -> int:
    from training.chat import run_chat

    return run_chat(args, realm, config)
