"""The `opdx` command.

opdx verify [--samples N]       # exact check of the estimators (opdx/verify.py)
"""

from __future__ import annotations

import sys

COMMANDS = {
    "verify": "exact-enumeration check of the OPD and OPD+ estimators",
}


def usage() -> str:
    lines = ["usage: opdx <command> [args...]", "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "verify":
        from opdx import verify

        return verify.main(rest)
    print(f"opdx: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
    return 2
