import math

import torch

from opdx.logits import HeadLogits, RoutedScores, TopK, TopKOfLogits


def test_top_k_of_full_log_probs_and_as_a_server_gives_it():
    logq = torch.log(torch.tensor([[0.5, 0.05, 0.4, 0.05]], dtype=torch.float64))
    top = TopK.of(logq, 2, torch.tensor([1]))
    assert top.ids.tolist() == [[0, 2]] and top.logq.exp().tolist() == [[0.5, 0.4]]
    assert abs(math.exp(top.logq_tail.item()) - 0.1) < 1e-12
    assert abs(top.logq_token.exp().item() - 0.05) < 1e-12
    served = TopK.served(top.ids, top.logq, top.logq_token)  # the tail from the k alone: 1 - 0.9
    torch.testing.assert_close(served.logq_tail, top.logq_tail)
    tiny_tail = TopK.served(top.ids, torch.log(torch.tensor([[1 - 1e-7, 0.0]], dtype=torch.float64)), top.logq_token)
    assert abs(tiny_tail.logq_tail.item() - math.log(1e-7)) < 1e-6  # no cancellation to 0: log(-expm1(.))
    everything = TopK.served(top.ids, torch.log(torch.tensor([[0.5, 0.5]])), top.logq_token)
    assert everything.logq_tail.item() == -math.inf


def test_head_logits_make_any_states_chunk_from_hidden_states():
    torch.manual_seed(0)
    head = torch.nn.Linear(3, 5)
    hidden_B_T_D, mask_B_T = torch.randn(2, 4, 3), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    states = HeadLogits(hidden_B_T_D, head).at(mask_B_T)
    torch.testing.assert_close(states.chunk(1, 4), head(hidden_B_T_D[mask_B_T][1:4]))
    top = TopKOfLogits(HeadLogits(hidden_B_T_D, head), torch.arange(8).view(2, 4) % 5, 2).at(mask_B_T).chunk(0, 5)
    logq = head(hidden_B_T_D[mask_B_T]).log_softmax(-1)
    torch.testing.assert_close(top.logq, logq.topk(2).values)
    torch.testing.assert_close(
        top.logq_token, logq.gather(-1, (torch.arange(8).view(2, 4) % 5)[mask_B_T][:, None])[:, 0]
    )


def test_routed_scores_put_each_parts_states_in_their_places_within_any_chunk():
    """Rows 0 and 2 from one model, 1 and 3 from another (another hidden size): every chunk of the
    masked states, whatever its bounds, equals the one model's logits computed over all rows."""
    torch.manual_seed(0)
    heads = torch.nn.Linear(3, 6), torch.nn.Linear(2, 6)
    hidden = torch.randn(2, 5, 3), torch.randn(2, 5, 2)
    mask_B_T = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    rows = torch.tensor([0, 2]), torch.tensor([1, 3])
    routed = RoutedScores([(r, HeadLogits(h, head)) for r, h, head in zip(rows, hidden, heads, strict=True)], 4)
    expected_B_T_V = torch.empty(4, 5, 6)
    for r, h, head in zip(rows, hidden, heads, strict=True):
        expected_B_T_V[r] = head(h).detach()
    expected_S_V = expected_B_T_V[mask_B_T]
    states = routed.at(mask_B_T)
    for start, end in [(0, 11), (0, 3), (3, 7), (7, 11), (2, 9)]:
        torch.testing.assert_close(states.chunk(start, end).detach(), expected_S_V[start:end])
    tokens_B_T = torch.zeros(4, 5, dtype=torch.long)
    routed_top = RoutedScores(
        [
            (r, TopKOfLogits(HeadLogits(h, head), tokens_B_T[r], 2))
            for r, h, head in zip(rows, hidden, heads, strict=True)
        ],
        4,
    ).at(mask_B_T)
    torch.testing.assert_close(routed_top.chunk(2, 9).logq.detach(), expected_S_V[2:9].log_softmax(-1).topk(2).values)
