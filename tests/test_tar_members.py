"""disco_dist/data/tar_members.py reads a shard as webdataset does (the same samples from the same archive), without
Python's tarfile on the read path."""

import io
import tarfile

import numpy as np
import pytest
from webdataset.tariterators import group_by_keys, tar_file_iterator

from disco_dist.core.errors import RankError
from disco_dist.data.shards import ShardFile
from disco_dist.data.tar_members import tar_samples


def webdataset_samples(data: bytes) -> list:
    files = ({**f, "__url__": "x"} for f in tar_file_iterator(io.BytesIO(data)))
    return [{k: v for k, v in sample.items() if k != "__url__"} for sample in group_by_keys(files)]


def archive(tar_format, members) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        for name, content, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "elsewhere"
            info.size = len(content) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(content) if kind == tarfile.REGTYPE else None)
    return buffer.getvalue()


def test_a_shard_written_here_reads_the_same_as_with_webdataset(tmp_path):
    shard = ShardFile(tmp_path / "shard-000000.tar")
    for i in range(5):
        ids = np.arange(i + 2, dtype="<u2")
        shard.write(f"{i:09d}", f"sentence {i} ü", np.full(4, i, dtype=np.float32), ids if i % 2 else None)
    shard.close()
    data = (tmp_path / "shard-000000.tar").read_bytes()
    ours = list(tar_samples(data, "shard-000000.tar"))
    assert ours == webdataset_samples(data)
    assert [s["txt"].decode() for s in ours] == [f"sentence {i} ü" for i in range(5)]


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_long_names_prefixes_folders_and_metadata_read_as_webdataset_reads_them(tar_format):
    deep = "a" * 60 + "/" + "b" * 60  # over 100 characters: a pax record, a GNU long name or a ustar prefix
    members = [
        ("__meta__/k0.txt", b"{}", tarfile.REGTYPE),  # a webdataset metadata folder: skipped
        ("folder", b"", tarfile.DIRTYPE),
        (f"{deep}/k1.txt", b"one", tarfile.REGTYPE),
        (f"{deep}/k1.Teacher.F16", b"\x00\x3c", tarfile.REGTYPE),
        ("k2.txt", b"two", tarfile.REGTYPE),
        ("k3.txt", b"x" * 1500, tarfile.REGTYPE),  # over several blocks
        ("noextension", b"skipped by both", tarfile.REGTYPE),
    ]
    data = archive(tar_format, members)
    ours = list(tar_samples(data, "t.tar"))
    assert ours == webdataset_samples(data)
    assert [s["__key__"] for s in ours] == [f"{deep}/k1", "k2", "k3"] and "teacher.f16" in ours[0]


@pytest.mark.parametrize(
    ("name", "kind", "what"),
    [
        ("k.link", tarfile.SYMTYPE, "a symbolic link"),
        ("k.hard", tarfile.LNKTYPE, "a hard link"),
        ("k.dev", tarfile.CHRTYPE, "a character device"),
        ("k.fifo", tarfile.FIFOTYPE, "a FIFO"),
        ("/etc/k.txt", tarfile.REGTYPE, "an absolute path"),
        ("../k.txt", tarfile.REGTYPE, "a '..' path"),
        ("a/../../k.txt", tarfile.REGTYPE, "a '..' path"),
    ],
)
def test_a_shard_holding_a_link_a_device_or_a_path_out_is_refused_naming_shard_and_member(name, kind, what):
    data = archive(tarfile.PAX_FORMAT, [("k0.txt", b"fine", tarfile.REGTYPE), (name, b"x", kind)])
    with pytest.raises(RankError) as refused:
        list(tar_samples(data, "shard-000007.tar"))
    assert str(refused.value).startswith(f"shard-000007.tar: member {name!r} is {what}"), str(refused.value)


def test_a_truncated_shard_stops_with_one_line_naming_it():
    data = archive(tarfile.PAX_FORMAT, [("k.txt", b"y" * 2000, tarfile.REGTYPE)])
    with pytest.raises(RankError, match="cut.tar: a tar member runs past the end of the shard"):
        list(tar_samples(data[:1200], "cut.tar"))


def test_a_repeated_field_of_one_sample_stops_as_corrupt():
    data = archive(tarfile.PAX_FORMAT, [("k.txt", b"a", tarfile.REGTYPE), ("k.txt", b"b", tarfile.REGTYPE)])
    with pytest.raises(RankError, match="k.txt appears twice"):
        list(tar_samples(data, "twice.tar"))
