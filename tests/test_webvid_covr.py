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


def test_a_description_column_reaches_the_query_text_only_when_asked(tmp_path):
    """Long-text data gives each query video a description: read, packed with its triplet,
    joined after the edit by model.description=concat, ignored by default."""
    from configs import ConfigError, load_config
    from sharding.batch import query_text
    from sharding.format import raw_triplet
    from sharding.records import build_records

    path = tmp_path / "long.csv"
    path.write_text(
        HEADER.rstrip("\n")
        + ",description\n"
        + ROW.rstrip("\n")
        + ',"A brown dog, ""Rex"", runs — fast ☀ across a lawn."\n'
        + ROW.rstrip("\n")
        + ",\n",
        encoding="utf-8",
    )
    first, second = read_annotations(path)
    assert first.description == 'A brown dog, "Rex", runs — fast ☀ across a lawn.'
    assert second.description == ""
    ecde = tmp_path / "ecde.csv"  # ECDE / Dense-WebVid-CoVR name the column `caption`
    ecde.write_text(HEADER.rstrip("\n") + ",caption\n" + ROW.rstrip("\n") + ",a dog runs\n")
    assert read_annotations(ecde)[0].description == "a dog runs"
    record = build_records([first], "triplet")[0]
    meta = {"target": record["target"], "target_id": 0, "triplets": record["triplets"]}
    packed = {"__key__": "k", "q0_000.jpg": b"", "t_000.jpg": b""}
    raw = raw_triplet(packed, 0, meta)
    assert raw["description"] == first.description
    sample = {"edit": first.edit, "description": raw["description"]}
    assert query_text(sample, "ignore") == first.edit
    assert query_text(sample, "concat") == f"{first.edit} {first.description}"
    assert query_text({"edit": "x", "description": ""}, "concat") == "x"
    with pytest.raises(ValueError, match="unknown model.description 'both'"):
        query_text(sample, "both")
    with pytest.raises(ConfigError, match="model.description"):
        load_config(None, ["model.description=both"])
    # the reader's decoded sample carries it into collate, which joins it when asked
    import numpy as np

    from sharding.batch import collate
    from tests.tiny import tiny_model

    _, tok = tiny_model(tmp_path)
    frame = np.zeros((1, 8, 8, 3), np.uint8)
    decoded = {"edit": raw["edit"], "description": raw["description"], "scores": []}
    decoded |= {"target_id": 0, "query_frames": frame, "target_frames": frame}
    lengths = [
        int(collate([decoded], tok, 8, 64, description=how)["attention_mask"].sum())
        for how in ("ignore", "concat")
    ]
    assert lengths[1] > lengths[0]
