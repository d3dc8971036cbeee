import pytest

from data.webvid_covr import (
    AnnotationError,
    MissingVideosError,
    ReadReport,
    Triplet,
    drop_missing_videos,
    read_annotations,
    write_annotations,
)

HEADER = "pth1,pth2,txt1,txt2,edit,scores,sim_txt\n"
ROW = (
    '001_050/11,001_050/12,"A dog, running ""fast"" on grass","A cat, running on grass",'
    '"Replace the dog with a cat","[0.31, 0.29, 0.3]",0.8\n'
)


def test_reads_published_format_with_quotes_and_commas(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text(HEADER + ROW)
    (row,) = read_annotations(path)
    assert row.pth1 == "001_050/11" and row.pth2 == "001_050/12"
    assert row.txt1 == 'A dog, running "fast" on grass'
    assert row.edit == "Replace the dog with a cat"
    assert row.scores == [0.31, 0.29, 0.3] and row.sim_txt == 0.8


def test_write_read_round_trip(tmp_path):
    rows = [
        Triplet("a/1", "a/2", 'x, "y"', "z\nw", "Make it red", [0.1, 0.25], 0.5),
        Triplet("a/3", "a/4", "p", "q", "Change p to q", [], None),
    ]
    write_annotations(tmp_path / "r.csv", rows)
    assert read_annotations(tmp_path / "r.csv") == rows


def test_malformed_row_names_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + ROW + 'a/1,a/2,x,y,edit,"[0.1, oops]",\n' + ROW)
    with pytest.raises(AnnotationError, match=r"bad.csv:3"):
        read_annotations(path)
    report = ReadReport()
    rows = read_annotations(path, lenient=True, report=report)
    assert len(rows) == 2 and report.rows == 2
    assert len(report.malformed) == 1 and "bad.csv:3" in report.malformed[0]


def test_too_few_fields_and_empty_edit_are_malformed(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text(HEADER + "a/1,a/2,x\n")
    with pytest.raises(AnnotationError, match=r"short.csv:2: too few fields"):
        read_annotations(path)
    path.write_text(HEADER + 'a/1,a/2,x,y,,"[]",\n')
    with pytest.raises(AnnotationError, match=r"short.csv:2: empty column 'edit'"):
        read_annotations(path)


def test_missing_column_and_missing_file(tmp_path):
    path = tmp_path / "cols.csv"
    path.write_text("pth1,pth2,txt1\n")
    with pytest.raises(AnnotationError, match=r"cols.csv:1: missing column"):
        read_annotations(path)
    with pytest.raises(AnnotationError, match="not found"):
        read_annotations(tmp_path / "absent.csv")


def test_missing_videos_dropped_in_train_error_in_test(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("1", "2", "3"):
        (tmp_path / "d" / f"{name}.mp4").write_bytes(b"x")
    rows = [
        Triplet("d/1", "d/2", "", "", "e"),
        Triplet("d/1", "d/9", "", "", "e"),
        Triplet("d/8", "d/3", "", "", "e"),
    ]
    kept, dropped = drop_missing_videos(rows, tmp_path, "train")
    assert kept == rows[:1] and dropped == 2
    with pytest.raises(MissingVideosError) as err:
        drop_missing_videos(rows, tmp_path, "test")
    assert (
        len(err.value.missing) == 2 and "d/9.mp4" in str(err.value) and "d/8.mp4" in str(err.value)
    )
