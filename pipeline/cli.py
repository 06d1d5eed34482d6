"""The `facematch` console command: one entry point, one subcommand per service or tool."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

# subcommand -> "module:function"; imported lazily so `facematch topics` does not load FAISS.
COMMANDS: dict[str, tuple[str, str]] = {
    "embedder": ("pipeline.embedder.main:main", "run the embedder (photo events -> faces)"),
    "indexer": ("pipeline.indexer.main:main", "run the indexer + match service"),
    "bridge": ("pipeline.matcher.main:main", "run the HTTP bridge (port 5000)"),
    "topics": ("pipeline.topics:main", "create or list the topics: topics create|list"),
    "broker": ("pipeline.devbroker:main", "run the embedded Tansu broker (dev/test only)"),
    "stack": ("pipeline.stack:main", "start/stop broker + services in the background: stack up|down"),
    "models": ("pipeline.assets:models_fetch_main", "fetch model files: models fetch"),
    "photos": ("pipeline.assets:photos_fetch_main", "fetch the sample photos: photos fetch"),
    "eval": ("pipeline.evaluation.lfw:lfw_main", "accuracy: eval lfw --dir DIR"),
    "demo": ("pipeline.demo:main", "ingest real group photos and match a selfie"),
    "firestore-listener": ("pipeline.producers.listener:main_and_exit", "publish Firestore photo changes"),
    "bulk-ingest": ("pipeline.producers.bulk:main", "publish every photo of one or all events"),
    "photo-worker": ("pipeline.producers.poll_worker:main", "poll Firestore for new photos"),
    "keys": ("pipeline.matcher.auth:keys_main", "API keys: keys hash [KEY] (stdin if no KEY) [--role R]"),
    "reembed": ("pipeline.reembed:main", "re-embed an event with another model beside the current one, then switch"),
}


def _resolve(target: str) -> Callable[[list[str]], int]:
    module, func = target.split(":")
    entry: Callable[[list[str]], int] = getattr(import_module(module), func)
    return entry


def usage() -> str:
    """Help text listing every subcommand."""
    lines = ["usage: facematch <command> [args]", "", "commands:"]
    lines += [f"  {name:<20} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the subcommand's main(argv)."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help") or args[0] not in COMMANDS:
        print(usage(), file=sys.stderr if args and args[0] not in ("-h", "--help", "help") else sys.stdout)
        return 0 if not args or args[0] in ("-h", "--help", "help") else 2
    # "models fetch" / "photos fetch" / "eval lfw": drop the verb the tool implies.
    rest = args[1:]
    if args[0] in ("models", "photos") and rest[:1] == ["fetch"]:
        rest = rest[1:]
    if args[0] == "eval" and rest[:1] == ["lfw"]:
        rest = rest[1:]
    return int(_resolve(COMMANDS[args[0]][0])(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
