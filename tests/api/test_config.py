"""The decision config: valid files load, bad ones name the file, the entry and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.app import DEMO_CONFIG
from api.config import Action, Anchor, SlotKind, load_config
from api.exceptions import ConfigFileError

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
