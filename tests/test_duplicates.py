"""Duplicate annotation rows (the same pth1, pth2 and edit): counted, packed once, reported; a
file of 200,000 copies of one row packs as one triplet, quickly and in bounded memory."""

import tracemalloc

from data.webvid_covr import read_annotations
from sharding.pack import source_counts
from sharding.records import build_records

HEADER = "pth1,pth2,txt1,txt2,edit,scores,sim_txt\n"
ROW = 'a/1,a/2,a dog,a cat,"make it a cat",[0.5],0.9\n'


def test_duplicate_triplets_are_packed_once_and_counted(tmp_path, caplog):
    path = tmp_path / "train.csv"
    other = 'a/3,a/2,a cow,a cat,"make it a cat",[0.5],0.9\n'
    same_edit_other_case = 'a/1,a/2,a dog,a cat,"Make it a cat",[0.5],0.9\n'
    path.write_text(HEADER + ROW + other + ROW + same_edit_other_case + ROW)
    rows = read_annotations(path)
    with caplog.at_level("WARNING"):
        records = build_records(rows, "target")
    (record,) = records
    assert [t["row"] for t in record["triplets"]] == [0, 1, 3]  # first copies, rows kept true
    counts = source_counts(records, len(rows))
    assert counts["triplets"] == 3 and counts["duplicate_rows"] == 2
    assert "2 duplicate row(s) (same pth1, pth2 and edit) packed once: rows 2, 4" in caplog.text
    assert build_records(rows, "triplet")[2]["triplets"][0]["row"] == 3  # the same in triplet mode


def test_two_hundred_thousand_copies_of_one_row(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(HEADER + ROW * 200_000)
    rows = read_annotations(path)
    tracemalloc.start()
    records = build_records(rows, "target")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(records) == 1 and len(records[0]["triplets"]) == 1
    assert source_counts(records, len(rows))["duplicate_rows"] == 199_999
    # before, the one record held every copy (2.1 GB when packed)
    assert peak < 50 * 2**20
