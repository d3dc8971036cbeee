import pytest
import torch

from eval.metrics import item_ranks, map_at_k, positive_ranks, recall_at_k


def test_recall_hand_computed():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # positive 0 ranks first
            [0.5, 0.4, 0.6, 0.1],  # positive 1 ranks third
            [0.1, 0.2, 0.3, 0.4],  # positive 3 ranks first
        ]
    )
    got = recall_at_k(scores, [0, 1, 3], ks=(1, 2, 3))
    assert got == pytest.approx({1: 200 / 3, 2: 200 / 3, 3: 100.0})


def test_ties_are_pessimistic_and_removed_items_never_count():
    assert positive_ranks(torch.zeros(1, 5), [2]).tolist() == [4]
    scores = torch.tensor([[float("-inf"), 0.2, 0.5]])  # reference removed
    assert positive_ranks(scores, [1]).tolist() == [1]


def test_map_at_k_hand_computed():
    # relevant {a, c}: hits at ranks 1 and 3 -> AP@3 = (1/1 + 2/3) / 2
    got = map_at_k([["a", "b", "c", "d"]], [["a", "c"]], ks=(1, 3))
    assert got[1] == pytest.approx(100.0)  # min(K, |gt|) = 1
    assert got[3] == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_item_ranks_rank_every_item_pessimistically():
    # .5 and .5 tie: both take the worse place (2nd), as a positive would
    assert item_ranks(torch.tensor([0.1, 0.5, 0.9, 0.5])).tolist() == [3, 2, 0, 2]
    scores = torch.tensor([[0.1, 0.5, 0.9, 0.5]])
    assert [int(positive_ranks(scores, [i])[0]) for i in range(4)] == [3, 2, 0, 2]
