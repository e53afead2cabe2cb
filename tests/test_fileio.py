"""shed.fileio: atomic outputs (files and directories), JSONL byte stability, and error messages."""

import re

import pytest

from shed.fileio import ShedError, atomic_path, read_json, read_jsonl, write_json, write_jsonl, write_text


def siblings(path):
    """Temporary siblings atomic_path may leave: `.<name>.*` next to `path`."""
    return sorted(p.name for p in path.parent.glob(f".{path.name}.*"))


def test_atomic_path_replaces_a_file(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent.parent == tmp_path and tmp.name == "out.txt"
        assert not tmp.exists() and target.read_text() == "old"  # nothing visible before the block ends
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert siblings(target) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_creates_missing_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out.json"
    write_json(target, {"b": 1, "a": "é"})
    assert target.read_text(encoding="utf-8") == '{\n  "a": "é",\n  "b": 1\n}\n'
    assert siblings(target) == []


def test_atomic_path_replaces_a_directory_and_drops_its_old_contents(tmp_path):
    target = tmp_path / "model"
    (target / "sub").mkdir(parents=True)
    (target / "stale.bin").write_bytes(b"old")
    (target / "sub" / "deep.txt").write_text("old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "fresh.bin").write_bytes(b"new")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["fresh.bin"]
    assert (target / "fresh.bin").read_bytes() == b"new"
    assert siblings(target) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failing_block_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert siblings(target) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_failing_block_leaves_the_previous_directory_and_no_temporary(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"half")
        raise RuntimeError("boom")
    assert [p.name for p in target.iterdir()] == ["weights.bin"] and (target / "weights.bin").read_bytes() == b"old"
    assert siblings(target) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_failing_first_write_creates_nothing(tmp_path):
    target = tmp_path / "out.jsonl"

    def rows():
        yield {"id": "a"}
        raise ValueError("bad record")

    with pytest.raises(ValueError, match="bad record"):
        write_jsonl(target, rows())
    assert not target.exists() and list(tmp_path.iterdir()) == []


ROWS = [
    {"id": "b", "output": "line\u2028separator and \u0085 next-line and \u2029", "input": ""},
    {"z": [1, 2.5, None], "a": {"y": True, "x": "naïve ✓"}},
    {"id": "c", "output": "tab\there \"quoted\" back\\slash\nnewline"},
]


def test_jsonl_round_trip_is_byte_stable_with_sorted_keys_and_raw_utf8(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert write_jsonl(first, ROWS) == 3
    data = first.read_bytes()
    lines = data.split(b"\n")
    assert len(lines) == 4 and lines[-1] == b""  # three records, each ending in "\n"
    assert lines[1] == '{"a":{"x":"naïve ✓","y":true},"z":[1,2.5,null]}'.encode()  # sorted, compact, raw UTF-8
    assert "\u2028".encode() in lines[0] and b"\\u" not in data
    back = read_jsonl(first)
    assert back == ROWS  # U+2028 / U+0085 / U+2029 inside a string do not split a record
    write_jsonl(second, back)
    assert second.read_bytes() == data
    # Key order of the input does not matter.
    write_jsonl(second, [dict(reversed(list(r.items()))) for r in ROWS])
    assert second.read_bytes() == data


def test_read_jsonl_skips_blank_lines_and_accepts_a_bom(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"id": 1}\n\n   \r\n{"id": 2}\r\n')
    assert read_jsonl(path) == [{"id": 1}, {"id": 2}]


@pytest.mark.parametrize("text, line, what", [
    ('{"id": 1}\n{"id": 2\n', 2, "not valid JSON"),
    ('{"id": 1}\n\n\n[1, 2]\n', 4, "expected a JSON object, got list"),
    ('"just a string"\n', 1, "expected a JSON object, got str"),
    ('{"id": 1}\n{"id": "a\u2028b"}\n{oops}\n', 3, "not valid JSON"),
])
def test_read_jsonl_errors_name_the_file_and_the_one_based_line(tmp_path, text, line, what):
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ShedError) as info:
        read_jsonl(path)
    assert str(info.value).startswith(f"{path}: line {line}: {what}")


def test_read_json_on_bad_json_names_the_file_and_line(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text('{\n  "a": 1,\n  "b": \n}\n')
    with pytest.raises(ShedError, match=rf"^{re.escape(str(path))}: line 4: not valid JSON \(Expecting value\)$"):
        read_json(path)
    write_json(path, {"b": [1, 2], "a": None})
    assert read_json(path) == {"a": None, "b": [1, 2]}


def test_missing_files_and_directories_are_named(tmp_path):
    with pytest.raises(ShedError, match=rf"^{re.escape(str(tmp_path / 'nope.jsonl'))}: file not found$"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ShedError, match=rf"^{re.escape(str(tmp_path))}: is a directory, expected a file$"):
        read_json(tmp_path)


def test_non_utf8_error_names_the_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = b'{"id": "ok"}\n'
    path.write_bytes(good * 2 + b'{"id": "caf' + b"\xe9" + b'"}\n')
    with pytest.raises(ShedError) as info:
        read_jsonl(path)
    offset = len(good) * 2 + len('{"id": "caf')
    assert str(info.value) == f"{path}: line 3: not UTF-8 (byte 0xe9 at offset {offset})"
    with pytest.raises(ShedError, match=r": line 3: not UTF-8"):
        read_json(path)


def test_write_text_and_json_are_atomic_on_unserialisable_input(tmp_path):
    path = tmp_path / "m.json"
    write_text(path, "kept\n")
    with pytest.raises(TypeError):
        write_json(path, {"x": object()})  # fails before anything is written
    with pytest.raises(TypeError):
        write_jsonl(path, [{"ok": 1}, {"x": object()}])  # fails half-way through the file
    assert path.read_text() == "kept\n" and siblings(path) == []


def test_a_block_that_writes_nothing_keeps_the_old_directory(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "kept.txt").write_text("old")
    with pytest.raises(FileNotFoundError), atomic_path(target):
        pass
    assert (target / "kept.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_directory_can_replace_a_file_and_a_file_a_directory(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "inner.txt").write_text("x")
    assert (target / "inner.txt").read_text() == "x"
    with atomic_path(target) as tmp:
        tmp.write_text("a file again")
    assert target.read_text() == "a file again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_non_utf8_after_a_bom_names_the_byte_and_its_offset_in_the_file(tmp_path):
    from shed.streaming import iter_jsonl

    path = tmp_path / "bom.jsonl"
    data = b"\xef\xbb\xbf" + b'{"id": "ok"}\n' + b'{"id": "caf\xe9"}\n'
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    expected = f"{path}: line 2: not UTF-8 (byte 0xe9 at offset {offset})"
    with pytest.raises(ShedError) as whole:
        read_jsonl(path)
    with pytest.raises(ShedError) as streamed:
        list(iter_jsonl(path))
    assert str(whole.value) == str(streamed.value) == expected
