"""Every option of every command, generated from the parser and the parameter table: an
out-of-range or wrong-type value is refused in one line naming the option or parameter, before
any model loads or any file is written (issue 36, class 1)."""

import argparse

import pytest

from spade_faiss.apps import cli
from spade_faiss.config import PARAM

# Values tried for each option; a value is used only where the option's declaration refuses it
# (the table's constraint, or argparse's type/choices).
CANDIDATES = ("-1", "0", "-0.5", "nan", "inf", "1e300", "abc", "")


def _subcommands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def _refused_by_declaration(action, value: str) -> bool:
    """Whether the option's own declaration refuses ``value`` (so the command must)."""
    if action.choices is not None and action.type is None:
        return value not in action.choices
    try:
        converted = action.type(value) if action.type else value
    except (TypeError, ValueError):
        return True
    if action.choices is not None and converted not in action.choices:
        return True
    check = PARAM[action.dest].check_value if action.dest in PARAM else \
        (lambda v: cli.OPTION_CHECKS[action.dest](action.dest, v)) if action.dest in cli.OPTION_CHECKS else None
    if check is None:
        return False
    try:
        check(converted)
    except ValueError:
        return converted is not None
    return False


def test_every_valued_option_has_a_declared_constraint():
    """A valued option is a parameter of the table, has choices, or has its constraint in
    cli.OPTION_CHECKS (paths, names and lists excepted): none is accepted unchecked."""
    free = {"out", "categories", "list", "token_file", "ray_address", "run", "store", "src", "image", "images",
            "dataset", "corpus", "name", "data", "workload", "report", "suite", "max_images", "extra"}
    unchecked = set()
    for name, p in _subcommands().items():
        for action in p._actions:
            if action.option_strings and action.nargs != 0 and action.dest not in {"help", "version"} and \
                    action.choices is None and action.dest not in PARAM and action.dest not in cli.OPTION_CHECKS \
                    and action.dest not in free:
                unchecked.add(f"{name} {action.option_strings[-1]}")
    assert not unchecked, sorted(unchecked)


def _cases():
    skip = {"help", "version", "verbose"}
    for name, p in _subcommands().items():
        for action in p._actions:
            if not action.option_strings or action.dest in skip or action.nargs == 0:
                continue
            if isinstance(action, argparse._StoreAction) or type(action).__name__ == "_Deprecated":
                for value in CANDIDATES:
                    if _refused_by_declaration(action, value):
                        flag = action.option_strings[-1]
                        yield pytest.param(name, flag, value, id=f"{name}{flag}={value!r}")
                        break  # one refused value per option keeps the suite short


POSITIONALS = {"index": ["{data}", "--out", "{tmp}/new.h5"], "reindex": ["{tmp}/c.h5"], "remove": ["{tmp}/c.h5"],
               "calibrate": ["{tmp}/c.h5", "{data}"], "score": ["{tmp}/c.h5", "{data}", "--out", "{tmp}/run"],
               "evaluate": ["{data}", "--out", "{tmp}/eval"],
               "explain": ["{tmp}/c.h5", "{img}", "--out", "{tmp}/x.png"],
               "report": ["{tmp}/run"], "convert": ["{tmp}/c.h5", "--out", "{tmp}/d.h5"], "info": ["{tmp}/c.h5"],
               "verify": ["{tmp}/c.h5"], "serve": ["{tmp}/c.h5"], "bench": []}


@pytest.mark.parametrize("command, option, value", list(_cases()))
def test_an_option_out_of_its_range_is_refused_in_one_line_before_any_work(command, option, value, tmp_path,
                                                                          dataset, capsys, monkeypatch):
    import spade_faiss.backbone as backbone

    def no_model(*a, **k):
        raise AssertionError("a model was built before the options were checked")
    monkeypatch.setattr(backbone, "load_extractor", no_model)
    fill = {"data": str(dataset), "tmp": str(tmp_path), "img": str(next((dataset / "test" / "good").iterdir()))}
    argv = [command] + [a.format(**fill) for a in POSITIONALS.get(command, [])] + [option, value]
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own refusal (type, choices): exit 2 with usage
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2), (argv, code, err)
    errors = [ln for ln in err if "error:" in ln]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
