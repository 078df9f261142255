import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.errors import LocalProtocolError, MalformedMessageError, TruncatedMessageError
from fedmq.wire.archive import pack_files, unpack_files
from fedmq.wire.framing import encode_frame

names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)


@given(st.dictionaries(names, st.binary(max_size=300), max_size=6))
def test_archive_round_trip_and_order_independence(files: dict[str, bytes]) -> None:
    packed = pack_files(files)
    assert pack_files(dict(reversed(list(files.items())))) == packed
    assert {name: bytes(view) for name, view in unpack_files(packed).items()} == files


def test_truncation_is_detected() -> None:
    packed = pack_files({"a.onnx": b"x" * 50, "manifest.json": b"{}"})
    for cut in range(len(packed)):
        with pytest.raises(TruncatedMessageError):
            unpack_files(packed[:cut])


@pytest.mark.parametrize(
    "entries",
    [[["../etc/passwd", 1]], [["a", 2]], [["a", 1], ["a", 0]], [["a", -1]], [["a"]], [["a", 0]]],
    ids=["traversal", "past-body", "repeat", "negative", "short-entry", "leftover"],
)
def test_malformed_archives(entries: list[list[object]]) -> None:
    with pytest.raises(MalformedMessageError):
        unpack_files(encode_frame("archive", {"files": entries}, b"x"))


def test_refuses_paths_when_packing() -> None:
    with pytest.raises(LocalProtocolError):
        pack_files({"dir/file": b""})
