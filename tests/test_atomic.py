"""Atomic writes: a failed write keeps the old file and leaves no temporary file; a good one replaces it."""

import pytest

from cope_pl.atomic import atomic_path, write_json_atomic


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text('{"a": ')  # half written when the writer dies
        raise RuntimeError("disk went away")
    assert target.read_text() == '{\n  "a": 1\n}' and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    write_json_atomic(target, {"a": 2})
    assert '"a": 2' in target.read_text() and len(list(tmp_path.iterdir())) == 1
