"""The parameter table (config.PARAMETERS) is the one owner of every parameter: these tests fail
when a default, a constraint or an option is declared anywhere else, or when Python and the
command line disagree."""

import argparse
import ast
import inspect
from pathlib import Path

import pytest

import spade_faiss
from spade_faiss.apps import cli
from spade_faiss.apps.commands import spade_params
from spade_faiss.config import DEFAULTS, PARAMETERS, PARAMS, RunOptions, SpadeConfig, feature_mismatch
from spade_faiss.detector import Spade

PACKAGE = Path(spade_faiss.__file__).parent
# Same name, another meaning (each with why).
OTHER_MEANING = {"synthetic.py:make_dataset(seed=...)": "the seed of generated test data",
                 "names.py:LEVELS": "the corpus file's group of level datasets",
                 "names.py:INDEX": "the corpus file's group of the image index",
                 "pruned.py:CHUNK_BYTES": "the pruned engine's GEMM output per call (cache-sized), not the faiss chunk",
                 "images.py:MAX_PIXELS": "the decoder's own bound on any image, above the service's upload limit"}


def test_defaults_follow_spec():
    c = SpadeConfig()
    assert (c.backbone, c.resize, c.crop, c.levels, c.storage) == \
        ("wide_resnet50_2", 256, 224, ("layer1", "layer2", "layer3"), "float16+zstd")
    assert (c.k_image, c.k_gallery, c.kappa, c.pixel_mode, c.sigma) == (5, 50, 1, "per_level", 4.0)


def test_json_round_trip():
    c = SpadeConfig(backbone="resnet18", crop=64, resize=72, levels=("layer1", "layer3"), kappa=3, nprobe=4,
                    storage="layer1=pca16,layer3=float16+zstd")
    assert SpadeConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("bad, word", [
    (dict(backbone="vgg"), "backbone"), (dict(crop=300), "crop"), (dict(k_image=60), "k_image"),
    (dict(kappa=0), "kappa"), (dict(levels=("layer4",)), "levels"), (dict(levels=("layer2", "layer1")), "levels"),
    (dict(pixel_mode="x"), "pixel_mode"), (dict(sigma=-1), "sigma"), (dict(storage="int8"), "storage"),
    (dict(storage="layer1=pca8"), "layer2"), (dict(storage="layer1=pca0,layer2=float16,layer3=float16"), "pca0"),
    (dict(pixel_mode="concat", levels=("layer2", "layer3")), "concat"), (dict(k_gallery=True), "k_gallery"),
])
def test_bad_values_name_the_parameter(bad, word):
    with pytest.raises(ValueError, match=word):
        SpadeConfig(**bad)


def test_no_numeric_parameter_takes_an_infinite_value():
    """An infinite budget, width or size is refused where it is declared (memory_gb=inf once
    passed its check and failed in int()); the finite values around the default still pass."""
    numeric = [p for p in PARAMETERS if isinstance(p.default, (int, float)) and not isinstance(p.default, bool)]
    assert {"memory_gb", "spill_gb", "sigma", "max_upload_mb"} <= {p.name for p in numeric}
    for p in numeric:
        for value in (float("inf"), float("-inf"), float("nan")):
            with pytest.raises(ValueError, match=p.name):
                p.check_value(value)
        p.check_value(p.default)


def test_storage_has_one_spelling_per_choice():
    assert SpadeConfig(storage="layer1=pca8,layer2=pca8,layer3=pca8").storage == "pca8"
    assert SpadeConfig(storage="compact").storage == "layer1=pca64,layer2=pca96,layer3=pca128"
    assert SpadeConfig(storage="compact", levels=("layer2",)).storage == "pca96"


def test_feature_mismatch_names_both_values():
    a = SpadeConfig().feature_dict()
    b = SpadeConfig(crop=200).feature_dict()
    assert feature_mismatch(a, b) == ["crop: store has 224, requested 200"]
    assert feature_mismatch(a, a) == []
    f16 = SpadeConfig(storage="float16").feature_dict()
    v1 = {**{k: v for k, v in f16.items() if k != "storage"}, "dtype": "float16"}  # format v1's spelling
    assert feature_mismatch(v1, f16) == []
    assert feature_mismatch(v1, a) == ["storage: store has 'float16', requested 'float16+zstd'"]


def test_every_parameter_is_declared_once_and_the_records_take_its_default():
    names = [p.name for p in PARAMETERS]
    assert len(names) == len(set(names))
    fields = {f.name: f.default for cls in (SpadeConfig, RunOptions) for f in cls.__dataclass_fields__.values()}
    for name in names:
        if name in fields:
            assert fields[name] == DEFAULTS[name], name
    signature = inspect.signature(Spade.__init__).parameters
    assert [n for n in signature if n != "self"] == list(PARAMS)
    assert {n: p.default for n, p in signature.items() if n != "self"} == {n: DEFAULTS[n] for n in PARAMS}
    for name in PARAMS:  # the docstring is made from the table
        assert f"{name} : default {DEFAULTS[name]!r}" in Spade.__doc__


def _literal_defaults(tree):
    """(function, argument) pairs of the package whose default for a table parameter is a literal."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + \
                node.args.kw_defaults
            for arg, default in zip(args, defaults):
                if arg.arg in DEFAULTS and isinstance(default, ast.Constant) and default.value is not None:
                    yield node.name, arg.arg


def _constant_defaults(tree):
    """Module constants named after a table parameter (``CHUNK_BYTES``, ``DEFAULT_FPR``) holding a literal."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name.isupper() and name.lower().removeprefix("default_") in DEFAULTS and \
                    isinstance(node.value, (ast.Constant, ast.BinOp)):
                yield "<module>", name


def test_no_module_declares_a_parameter_default_or_option_of_its_own():
    """Spade's parameters, the calibration's fpr and the service's address and limits: a literal
    default anywhere but the table fails this test."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        found += [f"{path.name}:{fn}({arg}=...)" for fn, arg in _literal_defaults(tree)]
        found += [f"{path.name}:{name}" for _, name in _constant_defaults(tree)]
        flags = {p.flag for p in PARAMETERS}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args \
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value in flags:
                found.append(f"{path.name}: add_argument({node.args[0].value!r})")
    assert [f for f in found if f not in OTHER_MEANING] == []


def _subparsers():
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help_and_the_table_default():
    for name, sub in _subparsers().items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.dest in DEFAULTS and action.default is not argparse.SUPPRESS:
                assert action.default == DEFAULTS[action.dest], f"{name} --{action.dest}"


@pytest.mark.parametrize("argv, want", [([], 5), (["--k-gallery", "3"], 3),
                                        (["--k-gallery", "3", "--k-image", "2"], 2)])
def test_k_image_follows_one_rule_from_python_and_the_cli(argv, want):
    args = cli.build_parser().parse_args(["score", "c.h5", "src", "--out", "o", *argv])
    params = spade_params(args)
    spade = Spade(**params, weights=None).validate_params()
    assert spade.config_.k_image == want
    assert SpadeConfig(**{k: v for k, v in params.items() if k in ("k_gallery", "k_image")}).k_image == want


def test_k_image_above_k_gallery_is_refused_from_python_and_the_cli():
    with pytest.raises(ValueError, match="k_image=6 must be <= k_gallery=3"):
        Spade(k_gallery=3, k_image=6, weights=None).validate_params()
    assert cli.main(["calibrate", "missing.h5", "x", "--k-gallery", "3", "--k-image", "6"]) == cli.EXIT_ERROR


def test_the_deprecated_dtype_option_still_means_storage():
    args = cli.build_parser().parse_args(["index", "src", "--out", "c.h5", "--dtype", "float32"])
    assert spade_params(args)["storage"] == "float32"


def test_the_service_limits_have_one_owner():
    """`serve`'s option defaults and `create_app`'s argument defaults are SERVICE_DEFAULTS."""
    pytest.importorskip("fastapi")
    from spade_faiss.apps import serve
    from spade_faiss.config import SERVICE_DEFAULTS

    args = cli.build_parser().parse_args(["serve", "c.h5"])
    signature = {**inspect.signature(serve.create_app).parameters, **inspect.signature(serve.run).parameters}
    assert cli.build_parser().parse_args(["serve", "c.h5", "--timeout", "3"]).timeout_s == 3.0  # its spelling
    for name, value in SERVICE_DEFAULTS.items():
        assert getattr(args, name) == value, name
        if name == "max_upload_mb":
            assert signature["max_upload_bytes"].default == int(value * 2**20)
        else:
            assert signature[name].default == value, name


def test_the_maps_choice_is_one_type_with_one_parser_per_surface():
    from spade_faiss.config import Maps

    assert [Maps.from_python(v) for v in (True, False, "auto")] == [Maps.ALL, Maps.NONE, Maps.AUTO]
    assert [Maps.from_cli(v) for v in ("all", "none", "auto")] == [Maps.ALL, Maps.NONE, Maps.AUTO]
    assert [Maps.from_http(v) for v in ("TRUE", "1", "no", "auto")] == [Maps.ALL, Maps.ALL, Maps.NONE, Maps.AUTO]
    for bad in ("all", 1, None, "true"):
        with pytest.raises(ValueError, match="maps="):
            Maps.from_python(bad)
    with pytest.raises(ValueError, match="map='maybe'"):
        Maps.from_http("maybe")
