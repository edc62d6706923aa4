"""The decision config: valid files load, bad ones name the file, the entry and the problem."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from api.app import DEMO_CONFIG
from api.config import Action, Anchor, SlotKind, load_config, parse_config
from api.exceptions import ConfigFileError
from api.items import ServingCatalog
from api.serving import compile_for
from stream_engine.catalog import Catalog
from stream_engine.demo_catalog import generate

BASE = """
version: v1
slots:
  hero: {kind: banner, default_banner: welcome}
  recs: {kind: items, n: 4}
banners:
  - {id: welcome, slots: [hero], title: Hi}
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "kairos.yaml"
    path.write_text(text)
    return path


def test_the_demo_config_loads() -> None:
    config = load_config(DEMO_CONFIG)
    assert config.slots["home_hero"].kind is SlotKind.BANNER
    assert config.slots["pdp_similar"].anchor is Anchor.CONTEXT
    assert {r.action for r in config.rules} == {Action.EXCLUDE, Action.BOOST}


def test_a_full_entry_reads_every_field(tmp_path: Path) -> None:
    text = (
        BASE
        + """
  - id: running
    slots: [hero]
    title: Run
    targeting: {categories: ["Sports >Running"], items: [sku-1]}
    priority: 2
    start: 2026-01-01T00:00:00Z
    end: 2027-01-01
    frequency_cap: 3
rules:
  - {id: pin1, slot: recs, action: pin, items: [sku-9], position: 2}
"""
    )
    config = load_config(_write(tmp_path, text))
    banner = config.banners[1]
    assert banner.categories == ("Sports > Running",)
    assert banner.frequency_cap == 3
    assert banner.priority == 2.0
    assert banner.window.start is not None
    assert banner.window.start.year == 2026
    assert config.rules[0].position == 2


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("  - {id: x, slots: [recs], title: X}", "(banner x): slot 'recs' is not a banner"),
        ("  - {id: welcome, slots: [hero], title: X}", "duplicate banner id 'welcome'"),
        ("  - {id: y, slots: [hero]}", "banners[1] (banner y): a banner needs a title"),
        ("  - {id: z, slots: [hero], title: Z, frequency_cap: -1}", "frequency_cap must be"),
        ("  - {id: w, slots: [hero], title: W, colour: red}", "unknown field(s) colour"),
        ("  - {id: 'bad id', slots: [hero], title: B}", "id must be an id"),
        ("  - {id: v, slots: [hero], title: V, start: tomorrow}", "start must be an ISO 8601"),
        ("rules:\n  - {id: r, slot: recs, action: shove, items: [a]}", "action must be one of"),
        ("rules:\n  - {id: r, slot: recs, action: boost, brands: [A], factor: 0.5}",
         "boost needs factor > 1"),
        ("rules:\n  - {id: r, slot: nope, action: exclude, items: [a]}", "'nope' is not an items"),
        ("rules:\n  - {id: r, action: exclude}", "needs items, categories or brands"),
    ],
)  # fmt: skip
def test_errors_name_the_file_the_entry_and_the_problem(
    tmp_path: Path, extra: str, problem: str
) -> None:
    path = _write(tmp_path, BASE + extra + "\n")
    with pytest.raises(ConfigFileError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert problem in str(err.value)


def test_broken_yaml_says_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "version: v1\nslots: {a: [\n")
    with pytest.raises(ConfigFileError, match=r"kairos.yaml:\d+: not valid YAML"):
        load_config(path)


def test_a_banner_slot_needs_a_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="slot hero: a banner slot needs default_banner"):
        load_config(_write(tmp_path, "version: v1\nslots:\n  hero: {kind: banner}\n"))


def test_missing_file_and_missing_version(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigFileError, match="version is required"):
        load_config(_write(tmp_path, BASE.replace("version: v1", "")))


_WORDS = ["home_recs", "banner", "items", "pin", "Sports > Running", "2026-13-01", "sku-000001"]
_KEYS = ["id", "slots", "kind", "n", "max_n", "targeting", "categories", "items", "action",
         "window", "start", "end", "frequency_cap"]  # fmt: skip
_LEAF = (
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True)
    | st.text(max_size=12) | st.sampled_from(_WORDS)
)  # fmt: skip
_VALUE = st.recursive(
    _LEAF,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(_KEYS), inner, max_size=3)
    ),
    max_leaves=8,
)
_DEMO = yaml.safe_load(DEMO_CONFIG.read_text())
_CATALOG = ServingCatalog(Catalog(generate(300)))


@st.composite
def _mutated(draw: st.DrawFn) -> Any:
    """The demo config with one value somewhere in it replaced (or one key added), so that
    the checks deep inside slots, banners and rules are reached, not only the top's."""
    config = copy.deepcopy(_DEMO)
    node: Any = config
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            return config
        key = draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, dict | list) and child and draw(st.integers(0, 4)) > 0:
            node = child
            continue
        if isinstance(node, dict) and draw(st.integers(0, 4)) == 0:
            key = draw(st.text(max_size=10))  # an unknown (or a known) key added
        node[key] = draw(_VALUE)
        return config


@settings(max_examples=500, deadline=None)
@given(raw=_mutated())
def test_any_config_is_taken_and_compiles_or_is_refused_with_a_config_error(raw: Any) -> None:
    """A reload of a bad file must keep the config in force and say what is wrong: a
    ConfigFileError, never another exception (the reload would answer 500 and the refresher
    log a crash); and a config that loads must compile against a catalog."""
    try:
        config = parse_config(raw, "kairos.yaml")
    except ConfigFileError as exc:
        problem = str(exc)
    else:
        compile_for(config, _CATALOG, dt.datetime(2026, 12, 6, tzinfo=dt.UTC))
        return
    assert problem.startswith("kairos.yaml")  # the file named
