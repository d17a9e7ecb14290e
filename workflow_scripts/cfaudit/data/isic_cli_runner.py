"""Run the installed isic-cli against another ISIC API root (a mirror, or the tests' loopback server).

    python -m cfaudit.data.isic_cli_runner --api-root http://127.0.0.1:8765 -- image download ... OUTDIR

isic-cli knows three environments (prod, sandbox, dev) through ``isic_cli.cli.DOMAINS``; its hidden
``--dev`` flag selects ``DOMAINS["dev"]``. This wrapper points that entry at ``--api-root`` (the URL
*without* ``/api/v2/``) and then runs isic-cli's own ``main()`` with ``--dev`` prepended, so every line
of the download is isic-cli's real code. The default Archive is reached through the ``isic`` console
script instead (see cfaudit.data.isic.cli_command).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[0] != "--api-root" or argv[2] != "--":
        print("usage: python -m cfaudit.data.isic_cli_runner --api-root URL -- <isic arguments>", file=sys.stderr)
        return 2
    root, isic_args = argv[1].rstrip("/"), argv[3:]

    from isic_cli import cli as isic_cli

    isic_cli.DOMAINS["dev"] = root
    sys.argv = ["isic", "--dev", *isic_args]
    isic_cli.main()  # click exits through SystemExit; a caught crash returns None (the caller verifies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
