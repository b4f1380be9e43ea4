"""Property-based tests: whatever a user or a file hands the parsers, they answer or raise EdgekitError.

Three loaders take untrusted text: the skip-set parser (command line), the recipe loader (YAML files)
and the manifest loader (edgekit.json from someone else's bundle). Example counts stay modest for CI.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgekit.bundle.folder import MANIFEST, read_bundle
from edgekit.bundle.manifest import validate_manifest
from edgekit.errors import EdgekitError
from edgekit.skip.skipset import SkipSet, parse_layer_list, parse_skip_count
from edgekit.targets.recipes import RECIPES_DIR, parse_recipe

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
SKIP_TEXT = st.text(alphabet="0123456789,- \t²٣auto:x", max_size=30) | st.text(max_size=30)


# --- skip sets ---


@FUZZ
@given(text=SKIP_TEXT, num_layers=st.integers(min_value=1, max_value=64))
@example(text="1" * 5000, num_layers=5)
@example(text="²", num_layers=5)
@example(text="0-99999999999", num_layers=5)
def test_skip_layer_list_parses_or_says_why(text, num_layers):
    try:
        layers = parse_layer_list(text)
    except EdgekitError:
        return
    assert all(isinstance(i, int) and i >= 0 for i in layers)
    try:
        skip = SkipSet.explicit(layers, num_layers)
    except EdgekitError:
        return
    assert sorted(skip.skipped + skip.kept) == list(range(num_layers)) and skip.kept


@FUZZ
@given(text=SKIP_TEXT)
@example(text="auto:" + "9" * 5000)
def test_skip_count_parses_or_says_why(text):
    try:
        value = parse_skip_count(text)
    except EdgekitError:
        return
    assert (isinstance(value, int) and value >= 0) or (isinstance(value, str) and value.startswith("auto:"))


# --- recipes ---

RECIPE = yaml.safe_load((RECIPES_DIR / "raspberry-pi-5.yaml").read_text())


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))


def _mutate(tree, path, value, delete):
    tree = copy.deepcopy(tree)
    if not path:
        return value
    node = tree
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return tree


@st.composite
def mutated(draw, base):
    paths = list(_paths(base))
    path = draw(st.sampled_from(paths))
    return _mutate(base, path, draw(JSON), draw(st.booleans()) and bool(path))


@FUZZ
@given(text=st.text(max_size=200))
@example(text="a: [" * 2000)
@example(text="&a [*a]")
@example(text="!!python/object/apply:os.system ['true']")
def test_recipe_text_loads_or_says_why(text):
    with contextlib.suppress(EdgekitError):
        parse_recipe(text, "fuzz.yaml")


@FUZZ
@given(data=mutated(RECIPE))
def test_mutated_recipe_loads_or_says_why(data):
    try:
        recipe = parse_recipe(yaml.safe_dump(data), "fuzz.yaml")
    except EdgekitError:
        return
    assert recipe.name and "/" not in recipe.name


# --- manifests ---


@pytest.fixture(scope="module")
def real_manifest(bundle_factory) -> dict:
    return json.loads((bundle_factory(skip=2, quant="int4") / MANIFEST).read_text())


@FUZZ
@given(value=JSON)
def test_any_json_is_a_manifest_or_refused(value):
    with contextlib.suppress(EdgekitError):
        validate_manifest(value)


@FUZZ
@given(data=st.data())
def test_mutated_manifest_is_refused_or_fully_usable(tmp_path_factory, real_manifest, data):
    """A manifest the schema accepts must be safe to use: `inspect` renders it without an exception."""
    from edgekit.cli import cli

    m = data.draw(mutated(real_manifest))
    folder = tmp_path_factory.mktemp("m")
    (folder / MANIFEST).write_text(json.dumps(m))
    try:
        read_bundle(folder)
    except EdgekitError:
        return
    result = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert result.exception is None, f"{type(result.exception).__name__}: {result.exception}"


@settings(max_examples=40, deadline=None)
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_manifest_bytes_are_read_or_refused(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("m")
    (folder / MANIFEST).write_bytes(raw)
    with pytest.raises(EdgekitError):
        read_bundle(folder)


def test_a_real_manifest_is_accepted(real_manifest, tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps(real_manifest))
    assert read_bundle(Path(tmp_path)).manifest == real_manifest


# --- checkpoint configs ---

CONFIG = json.loads((Path(__file__).resolve().parents[1] / "edgekit/data/stories260k/config.json").read_text())
SIZES = st.one_of(st.integers(min_value=-2, max_value=10**12), st.none(), st.text(max_size=5), st.floats(), JSON)


@st.composite
def mutated_config(draw):
    c = dict(CONFIG)
    for key in draw(st.lists(st.sampled_from(sorted(CONFIG)), min_size=1, max_size=3, unique=True)):
        if draw(st.booleans()):
            c[key] = draw(SIZES)
        else:
            del c[key]
    return c


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=mutated_config())
def test_untrusted_config_opens_or_says_why(tmp_path_factory, stories_path, config):
    """config.json comes from a stranger: any values give a checkpoint or an EdgekitError."""
    from edgekit.checkpoint.load import open_checkpoint

    folder = tmp_path_factory.mktemp("cfg")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").symlink_to(stories_path / "model.safetensors")
    try:
        ckpt = open_checkpoint(folder, "fuzz")
    except EdgekitError:
        return
    assert ckpt.spec.num_layers >= 1
