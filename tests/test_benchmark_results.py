"""benchmarks/results.py: each benchmark replaces only its own section of RESULTS.md."""

from __future__ import annotations

from benchmarks import results


def test_write_section_replaces_its_own_section_and_appends_new_ones(tmp_path, monkeypatch):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmarks\n\n## a\n\nold a\n\n## b\n\nkeep b\n")
    monkeypatch.setattr(results, "RESULTS", path)
    results.write_section("## a\n\nnew a\n")
    results.write_section("## c\n\nnew c")
    assert path.read_text() == "# Benchmarks\n\n## a\n\nnew a\n\n## b\n\nkeep b\n\n## c\n\nnew c\n"
