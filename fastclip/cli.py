"""The ``fastclip`` console command: ``fastclip info | train | eval``.

Each subcommand lives in its own module and exposes ``main(argv) -> int``; this file only routes.
"""
import argparse
import difflib
import re
import sys
import textwrap
from importlib import import_module

SUBCOMMANDS = {
    "info": ("fastclip.info", "print which loss backends and attention kernels run here, and why not"),
    "train": ("fastclip.train.main", "train CLIP (no flags: the embedded synthetic set on CPU)"),
    "eval": ("fastclip.eval.main", "zero-shot / retrieval / linear-probe evaluation of a checkpoint"),
}


def plain_text(docstring: str) -> str:
    """A docstring's reStructuredText as the plain text ``--help`` prints: ````x```` -> ``x``, a
    paragraph-ending ``::`` -> ``:``, ``\\`` line continuations kept (they are shell)."""
    text = re.sub(r"``([^`]+)``", r"\1", docstring)
    text = re.sub(r"(?<=\S)::$", ":", text, flags=re.MULTILINE)
    return re.sub(r"^::$\n?", "", text, flags=re.MULTILINE)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with each default shown once: ``(default: X)`` is added to a flag's help unless the help
    already names its default, or the default is nothing to show (None, False, a suppressed value).
    The description is printed as written (RawDescription)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is False or default is argparse.SUPPRESS
                or action.option_strings == [] or isinstance(action, argparse._HelpAction)):
            return text
        shown = repr(default) if isinstance(default, str) and (not default or default.isspace()) else "%(default)s"
        return f"{text} (default: {shown})" if text else f"default: {shown}"

    def _split_lines(self, text: str, width: int) -> list:
        """Wrap at spaces only: names such as ViT-bigG-14 and --lock-text stay whole."""
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class FlagError(ValueError):
    """A command line that cannot be parsed: one line naming the flag and the fix (exit status 2)."""


class FlagParser(argparse.ArgumentParser):
    """argparse with whole flag names only and one-line errors.

    - No prefix abbreviations (``allow_abbrev=False``): ``--batch 8`` is an unknown flag, not ``--batch-size``.
    - An unknown flag gets "did you mean" (difflib) instead of the usage block.
    - Every error raises :class:`FlagError` (a ValueError), which the subcommand prints as one line and
      turns into exit status 2. ``--help`` still exits 0.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise FlagError(f"{message} ('{self.prog} --help' lists the flags)")

    def known_flags(self) -> list[str]:
        return [flag for action in self._actions for flag in action.option_strings]

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        known = set(self.known_flags())
        unknown = [item for item in args if item.startswith("--") and item != "--" and item.split("=", 1)[0] not in known]
        if unknown:  # before argparse's own checks (a missing required flag would hide the typo)
            raise FlagError(self.unknown_message(unknown))
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            raise FlagError(self.unknown_message(extras))
        return namespace

    def unknown_message(self, extras: list[str]) -> str:
        flag = next((item for item in extras if item.startswith("-")), None)
        if flag is None:
            return (f"unexpected argument(s) {' '.join(extras)!r}: each flag takes at most one value, quote a value "
                    f"with spaces ('{self.prog} --help' lists the flags)")
        name = flag.split("=", 1)[0]
        close = difflib.get_close_matches(name, self.known_flags(), n=3, cutoff=0.6)
        prefixed = [known for known in self.known_flags() if known.startswith(name) and known not in close]
        hint = close + prefixed[:3 - len(close)] if len(close) < 3 else close
        suggestion = f"; did you mean {' or '.join(hint)}?" if hint else f"; '{self.prog} --help' lists the flags"
        abbreviation = " (flags are spelled out in full: no abbreviations)" if prefixed or any(
            known.startswith(name) for known in close) else ""
        return f"unknown flag {name}{suggestion}{abbreviation}"


def _usage() -> str:
    lines = ["usage: fastclip {" + ",".join(SUBCOMMANDS) + "} [flags]   |   fastclip --version", ""]
    lines += [f"  {name:<6} {help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    lines += ["", "Run 'fastclip SUBCOMMAND --help' for the flags of one subcommand."]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] in ("--version", "-V"):
        from fastclip import __version__

        print(f"fastclip {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"fastclip: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
