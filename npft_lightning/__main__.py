"""``python -m npft_lightning export|report ...``: the argparse tools (train / eval / analyze are the Hydra entries
``train.py``, ``eval.py``, ``analyze.py``)."""

from __future__ import annotations

import sys

TOOLS = ("export", "report")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in TOOLS:
        print(f"usage: python -m npft_lightning {{{','.join(TOOLS)}}} ...; see python -m npft_lightning <tool> --help",
              file=sys.stderr)
        sys.exit(2)
    if argv[0] == "export":
        from npft_lightning.tasks.export import main as tool
    else:
        from npft_lightning.tasks.report import main as tool
    tool(argv[1:])


if __name__ == "__main__":
    main()
