"""The short options of the ``pvtv2`` subcommands: a long option that has a short form in one subcommand has the same
one in every subcommand that takes it, and a short form means one long option everywhere (`pvtv2 demo` lacked the
`-o` of demo-det and demo-seg)."""

from __future__ import annotations

import argparse
from collections import defaultdict

from pvtv2.cli import build_parser, main


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _flags(sub: argparse.ArgumentParser) -> list[tuple[str, frozenset[str]]]:
    """(long option, its short forms) of each optional argument."""
    out = []
    for action in sub._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        shorts = frozenset(o for o in action.option_strings if not o.startswith("--"))
        out.extend((name, shorts) for name in longs)
    return out


def test_short_options_are_the_same_in_every_subcommand():
    commands = _subcommands()
    assert {"demo", "demo-det", "demo-seg", "train", "predict", "export"} <= set(commands)
    shorts_of: dict[str, dict[frozenset[str], list[str]]] = defaultdict(lambda: defaultdict(list))
    long_of: dict[str, set[str]] = defaultdict(set)
    for name, sub in commands.items():
        for long, shorts in _flags(sub):
            shorts_of[long][shorts].append(name)
            for short in shorts:
                long_of[short].add(long)
    differing = {long: {tuple(sorted(s)): sorted(c) for s, c in forms.items()} for long, forms in shorts_of.items()
                 if len(forms) > 1}
    assert differing == {}
    assert {short: longs for short, longs in long_of.items() if len(longs) > 1} == {}
    # the pairs every output-writing and model-reading subcommand shares
    assert set(shorts_of["--output"]) == {frozenset({"-o"})}
    assert set(shorts_of["--model"]) == {frozenset({"-m"})}


def test_demo_takes_o_for_output(tmp_path, capsys):
    """-o reaches the demo: an OUTPUT that is a file is named (refused before any work)."""
    taken = tmp_path / "taken"
    taken.write_bytes(b"kept")
    assert main(["demo", "-o", str(taken), "--epochs", "1", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == f"pvtv2 demo: error: --output {str(taken)!r} is a file, not a folder"


def _names_a_path(action: argparse.Action) -> bool:
    """An argument taking free text (not a number, a size...) whose help or metavar speaks of files or folders."""
    text = f"{action.help or ''} {action.metavar or ''}".lower()
    words = ("file", "folder", "dir", "image", "checkpoint", ".onnx", ".png")
    free_text = action.type is None or getattr(action.type, "__name__", "") == "_user_path"
    return free_text and action.nargs != 0 and action.choices is None and any(w in text for w in words)


# Free-text arguments whose help speaks of images or folders without naming one: a sub-folder's name inside --data,
# a model input size, multi-scale factors, the size an image is fitted into.
NOT_PATHS = {"split", "size", "scales", "fit"}


def test_every_path_argument_expands_a_tilde_the_shell_left(monkeypatch):
    """`--data=~/x` reaches the program as '~/x' (the shell expands ~ only at a word's start): every argument that
    names a file or folder, in every subcommand, expands it as the shell would have, HOME/x."""
    monkeypatch.setenv("HOME", "/home/someone")
    parser = build_parser()
    checked = set()
    for name, sub in _subcommands().items():
        argv, expected = [name], {}
        for action in sub._actions:
            if not _names_a_path(action) or action.dest in NOT_PATHS:
                continue
            typed = f"~/{action.dest}-arg"
            argv.append(f"{action.option_strings[-1]}={typed}" if action.option_strings else typed)
            expected[action.dest] = f"/home/someone/{action.dest}-arg"
        args = vars(parser.parse_args(argv))
        for dest, path in expected.items():
            value = args[dest]
            assert (value[0] if isinstance(value, list) else value) == path, (name, dest, value)
            checked.add(dest)
    assert checked == {"data", "model", "output", "output_dir", "images", "image", "onnx", "source"}  # every subcommand's --model, --output, --data, images...
    # a preset name, a hub id and a plain relative path pass as typed
    args = parser.parse_args(["export", "--model", "pvt_v2_b0", "--output=out/~x.onnx"])
    assert (args.model, args.output) == ("pvt_v2_b0", "out/~x.onnx")
