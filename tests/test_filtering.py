from data.captions import VideoMeta
from data.filtering import filter_triplets
from data.webvid_covr import Triplet


def test_author_or_category_rule_with_counts():
    meta = {
        "1": VideoMeta("alice", ["sport"]),
        "2": VideoMeta("alice", ["food"]),
        "3": VideoMeta(None, ["food", "city"]),
        "4": VideoMeta(None, ["nature"]),
        "5": VideoMeta("alice", ["sport"]),
    }
    rows = [
        Triplet("p/1", "p/2", "", "", "e"),  # same author
        Triplet("p/2", "p/3", "", "", "e"),  # shared category
        Triplet("p/3", "p/4", "", "", "e"),  # neither (null authors never match)
        Triplet("p/1", "p/5", "", "", "e"),  # both
        Triplet("p/1", "p/9", "", "", "e"),  # no metadata
    ]
    kept, report = filter_triplets(rows, meta)
    assert kept == [rows[0], rows[1], rows[3]]
    assert (report.total, report.kept, report.same_author, report.shared_category, report.both) == (
        5,
        3,
        2,
        2,
        1,
    )
    assert report.missing_metadata == 1
    kept, _ = filter_triplets(rows, meta, by_author=False)
    assert kept == [rows[1], rows[3]]
